"""The ``cvgraph`` command: what a data scientist types. Every command honours CVGRAPH_HOME."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    # Dagster's own chatter (automation fallbacks, resource init) is not for this terminal.
    logging.getLogger("dagster").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _ds():
    _quiet()
    from cvgraph.sdk import Datasets

    return Datasets()


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _upload(ds, path: Path, name: str | None) -> tuple[str, str, bool]:
    """Put ``path`` at ``incoming/<name>.zip`` unless the same bytes are already there."""
    from orchestration.sensors import pack_id_for

    key = f"incoming/{name or path.stem}.zip"
    data = path.read_bytes()
    lake = ds.lake
    uploaded = not (lake.exists(key) and lake.get(key) == data)
    if uploaded:
        lake.put_file(key, path)
    return key, pack_id_for(key), uploaded


def _pack_report(ds, pack_id: str) -> dict:
    from workloads.ingest import pack_keys

    rec = json.loads(ds.lake.get(pack_keys(pack_id)["record"]))
    return {"pack_id": pack_id, "accepted": rec["accepted"], "duplicates": rec["duplicates"], "rejected": rec["rejected"]}


@click.group()
def main() -> None:
    """cvgraph: image packs → originals → resized → edges → tables → frozen subsets → models → exports."""


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="pack name (default: the file name without .zip)")
def upload(path: Path, name: str | None) -> None:
    """Upload a pack to incoming/; the sensor (or `cvgraph sync`) takes it from there."""
    ds = _ds()
    key, pack_id, uploaded = _upload(ds, path, name)
    click.echo(f"{'uploaded' if uploaded else 'already there'}: {key} (pack {pack_id})")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="pack name (default: the file name without .zip)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def ingest(path: Path, name: str | None, as_json: bool) -> None:
    """Upload a pack and materialise its raw_packs partition now."""
    from assets.packs import PACK_KEY_TAG, raw_packs
    from partitions import packs

    ds = _ds()
    key, pack_id, _ = _upload(ds, path, name)
    ds.ensure_partition(packs, pack_id)
    result = ds.materialize([raw_packs.key], partition_key=pack_id, tags={PACK_KEY_TAG: key}, raise_on_error=False)
    if not result.success:
        msg = ds._runs.failure_message(result)
        if as_json:
            _print_json({"pack_id": pack_id, "error": msg})
        click.echo(f"error: pack {pack_id} ({path}) was not ingested: {msg}", err=True)
        sys.exit(2)
    report = _pack_report(ds, pack_id)
    if as_json:
        _print_json(report)
    else:
        click.echo(f"pack {pack_id}: {report['accepted']} accepted, {report['duplicates']} duplicates, {len(report['rejected'])} rejected")
        for r in report["rejected"]:
            click.echo(f"  rejected {r['member']!r}: {r['reason']}")


def _sync(ds) -> list[dict]:
    def on_run(keys, rng, run):
        click.echo(f"  ran {', '.join(keys)} over prefixes {rng[0]}..{rng[1]} in one run ({run.run_id[:8]})")

    return ds.sync(on_run=on_run)


@main.command()
def sync() -> None:
    """Materialise every image partition that is missing or stale (what automation would do)."""
    ds = _ds()
    packs_run = ds.tick_incoming(on_run=lambda p, r: click.echo(f"  ingested pack {p}: {'ok' if r.success else 'FAILED'}"))
    launched = _sync(ds)
    click.echo(f"{len(packs_run)} new pack(s), {len(launched)} prefix run(s)")


@main.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of row objects")
def query(sql: str, as_json: bool) -> None:
    """Run one read-only SELECT over `images` and `objects`."""
    from resources.catalog import QueryRefused

    ds = _ds()
    try:
        table = ds.sql_query(sql)
    except QueryRefused as e:
        raise click.ClickException(str(e)) from None
    rows = table.to_pylist()
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    cols = table.schema.names
    widths = [max(len(c), *(len(str(r[c])) for r in rows[:200])) if rows else len(c) for c in cols]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows[:200]:
        click.echo("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    if len(rows) > 200:
        click.echo(f"... {len(rows)} rows")


@main.command()
@click.argument("key")
@click.argument("sql")
def freeze(key: str, sql: str) -> None:
    """Freeze the result of SQL as the immutable subset KEY (through Dagster)."""
    from cvgraph.sdk import FreezeRefused

    ds = _ds()
    try:
        rec = ds.freeze_dataset(key, sql)
    except FreezeRefused as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"subset {key}: {rec['rows']} rows, manifest {rec['manifest_sha256'][:16]}, splits {rec['splits']}")


def _train(ds, key: str, subset: str | None, epochs: int | None) -> dict:
    from assets.models import trained_models
    from partitions import models

    ds.ensure_partition(models, key)
    cfg = {k: v for k, v in {"subset": subset, "epochs": epochs}.items() if v is not None}
    ds.materialize([trained_models.key], partition_key=key, run_config={"ops": {"trained_models": {"config": cfg}}})
    return json.loads(ds.lake.get(f"models/{key}/model.json"))


def _export(ds, key: str) -> dict:
    from assets.exports import export_keys, exported_models

    ds.materialize([exported_models.key], partition_key=key)
    return json.loads(ds.lake.get(export_keys(key)["record"]))


@main.command()
@click.argument("key")
@click.option("--subset", help="frozen subset to train on (default: the model's previous subset)")
@click.option("--epochs", type=int)
def train(key: str, subset: str | None, epochs: int | None) -> None:
    """Train model KEY on a frozen subset (local subprocess or SageMaker, by profile)."""
    ds = _ds()
    try:
        rec = _train(ds, key, subset, epochs)
    except ds._runs.RunFailed as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"model {key}: test accuracy {rec['test_accuracy']:.4f} ({rec['counts']['test']} held-out images), mlflow run {rec['mlflow_run_id']}")


@main.command()
@click.argument("key")
def export(key: str) -> None:
    """Export model KEY to TorchScript, ONNX and ONNX int8, checked for parity."""
    ds = _ds()
    try:
        rec = _export(ds, key)
    except ds._runs.RunFailed as e:
        raise click.ClickException(str(e)) from None
    for fmt, r in rec["formats"].items():
        click.echo(f"{fmt:12s} {r['key']}  {r['bytes']} bytes  max |Δlogit| {r['max_abs_error']:.2e}  top-1 agreement {r['top1_agreement']:.3f}")


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True)
def lineage(key: str, as_json: bool) -> None:
    """Lineage of a model/export or subset KEY: export → model → subset → prefix versions → packs."""
    from cvgraph.lineage import lineage_of, render

    ds = _ds()
    try:
        tree = lineage_of(ds, key)
    except KeyError as e:
        raise click.ClickException(str(e.args[0])) from None
    if as_json:
        _print_json(tree)
    else:
        click.echo(render(tree))


@main.command()
@click.option("--epochs", type=int, default=8, show_default=True)
def demo(epochs: int) -> None:
    """Build the demo packs from bundled images and run the whole graph on them."""
    from cvgraph.demo import run_demo

    _quiet()
    sys.exit(run_demo(epochs=epochs))


if __name__ == "__main__":
    main()
