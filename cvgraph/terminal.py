"""What the CLI and the demo print while runs go: one line per run, as it ends."""

from __future__ import annotations

import click


def echo_ingest(pack_id: str, run) -> None:
    """``on_run`` of ``Datasets.tick_incoming``."""
    click.echo(f"  ingested pack {pack_id}: {'ok' if run.success else 'FAILED'}")


def echo_range(keys: list[str], rng: tuple[str, str], run) -> None:
    """``on_run`` of ``Datasets.sync``."""
    click.echo(
        f"  ran {', '.join(keys)} over prefixes {rng[0]}..{rng[1]} in one run ({run.run_id[:8]})"
    )
