"""What the CLI and the demo print while runs go: their log lines as they come (stderr), and
one line per run as it ends."""

from __future__ import annotations

import sys

import click


def echo_progress(line: str) -> None:
    """``progress`` of ``Datasets``: a run's log line on stderr, above any progress bar (tqdm's,
    on a terminal), so stdout stays the command's result."""
    from tqdm import tqdm

    tqdm.write(f"  {line}", file=sys.stderr)


def echo_ingest(pack_id: str, run) -> None:
    """``on_run`` of ``Datasets.tick_incoming``."""
    click.echo(f"  ingested pack {pack_id}: {'ok' if run.success else 'FAILED'}")


def echo_range(keys: list[str], rng: tuple[str, str], run) -> None:
    """``on_run`` of ``Datasets.sync``."""
    click.echo(
        f"  ran {', '.join(keys)} over prefixes {rng[0]}..{rng[1]} in one run ({run.run_id[:8]})"
    )
