"""The ``cvgraph`` command: what a data scientist types. Every command honours CVGRAPH_HOME."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from workloads.training.spec import ARCHS, AUGMENT_LEVELS, TASKS  # dagster- and torch-free


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    # Dagster's own chatter (automation fallbacks, resource init) is not for this terminal.
    logging.getLogger("dagster").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # mlflow sets its loggers' level from this when it loads, after the line above
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _ds():
    _quiet()
    from cvgraph.sdk import Datasets
    from cvgraph.terminal import echo_progress

    return Datasets(progress=echo_progress)


def _spec_help(field: str) -> str:
    from workloads.training.spec import FIELDS  # dagster- and torch-free: --help stays fast

    default, what = FIELDS[field]
    return f"{what} (default {default if default != '' else 'none'}, or the model's last)"


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


class _Commands(click.Group):
    """A user's mistake, a setting missing or wrong, or a failed run (``CvgraphError``,
    ``SettingError``) is one line on stderr and exit 1, never a traceback, unless ``--debug`` asks
    for it (and for a failed run's whole messages)."""

    def invoke(self, ctx: click.Context):
        from cvgraph.sdk import CvgraphError
        from orchestration.settings import SettingError

        try:
            return super().invoke(ctx)
        except (CvgraphError, SettingError) as e:
            if ctx.params.get("debug"):
                click.echo(getattr(e, "details", str(e)), err=True)
                raise
            raise click.ClickException(str(e)) from None

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's usage errors (a missing argument, a bad choice, an unknown command) as one
        line with the help to read, not the usage block; exit 2 as click has it."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `cvgraph`: the help, as click does
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
            click.echo(f"Error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # --help and --version return their exit code


@click.group(cls=_Commands, name="cvgraph")
@click.version_option(package_name="cvgraph", prog_name="cvgraph")
@click.option("--debug", is_flag=True, help="on an error, the traceback and whole run messages")
def main(debug: bool) -> None:
    """cvgraph: image packs → originals → resized → edges → tables → frozen subsets → models → exports."""
    # stdout is the command's answer (--json): MLflow writes "View run … at <server URL>" there
    # when a run on a tracking server ends
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="pack name (default: the file name without .zip)")
@click.option("--json", "as_json", is_flag=True, help='print {"key", "pack_id", "uploaded"}')
def upload(path: Path, name: str | None, as_json: bool) -> None:
    """Upload a pack to incoming/; the sensor (or `cvgraph sync`) takes it from there."""
    up = _ds().upload(path, name)
    if as_json:
        return _print_json({"key": up.key, "pack_id": up.pack_id, "uploaded": up.uploaded})
    click.echo(f"{'uploaded' if up.uploaded else 'already there'}: {up.key} (pack {up.pack_id})")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="pack name (default: the file name without .zip)")
@click.option("--wait", is_flag=True, help="then sync, so its images are queryable on return")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def ingest(path: Path, name: str | None, wait: bool, as_json: bool) -> None:
    """Upload a pack and materialise its raw_packs partition now."""
    from cvgraph.sdk import PackNotIngested
    from cvgraph.terminal import echo_range

    ds = _ds()
    try:
        report = ds.ingest(path, name)
    except PackNotIngested as e:
        if as_json:
            _print_json({"pack_id": e.pack_id, "error": str(e)})
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if wait and not report["queryable"]:
        ds.sync(on_run=None if as_json else echo_range)
        report["queryable"] = not ds.waiting(report["pack_id"])
    if as_json:
        _print_json(report)
    else:
        click.echo(
            f"pack {report['pack_id']}: "
            + ("unchanged (these bytes were ingested before): " if report["unchanged"] else "")
            + f"{report['accepted']} accepted, {report['duplicates']} duplicates, {len(report['rejected'])} rejected"
        )
        labels = ", ".join(f"{k} {v}" for k, v in report["labels"].items())
        boxes = report["boxes"]
        click.echo(
            f"  labels: {labels or '(none)'}; boxes: {boxes['accepted']} accepted, {boxes['rejected']} rejected"
        )
        for r in report["rejected"]:
            click.echo(f"  rejected {r['member']!r}: {r['reason']}")
        for c in report["label_conflicts"]:
            given = ", ".join(f"{label!r} by {origin}" for origin, label in c["labels"].items())
            click.echo(f"  label conflict on {c['member']!r}: {given}; keeps {c['kept']!r}")
        click.echo(
            "  its images are queryable"
            if report["queryable"]
            else "  not queryable yet: `cvgraph sync` (or ingest --wait) indexes it; under `make ui` the daemon's automation does"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help='print {"packs", "runs"} when done')
def sync(as_json: bool) -> None:
    """Do what the lake is owed (what `cvgraph plan` shows): ingest every uploaded zip with no
    committed pack, then bring every prefix up to date. Runs left by killed commands are ended."""
    from cvgraph.terminal import echo_ingest, echo_range

    ds = _ds()
    packs_run = []

    def ingested(pack_id: str, run) -> None:
        packs_run.append(pack_id)
        if not as_json:
            echo_ingest(pack_id, run)

    left = []
    launched = ds.sync(
        on_run=None if as_json else echo_range, on_ingest=ingested, on_owed=left.append
    )
    owes = left[0]
    if as_json:
        return _print_json({"packs": packs_run, "runs": launched, "owed": owes.to_json()})
    click.echo(
        f"{len(packs_run)} pack(s) ingested, {len(launched)} prefix run(s); {owes.summary()}"
    )


@main.command()
@click.option("--prefixes", help="a backfill of these prefixes instead (00-3f, or a0,b1-b4)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(prefixes: str | None, as_json: bool) -> None:
    """What a sync (or a backfill of --prefixes) would do and cost, before anything runs: per
    stage, prefixes, images, Batch tasks, vCPU-hours, lake requests and bytes, dollars."""
    from cvgraph.plan import render

    p = _ds().plan(prefixes)
    click.echo(json.dumps(p, indent=2, sort_keys=True) if as_json else render(p))


@main.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of row objects")
def query(sql: str, as_json: bool) -> None:
    """Run one read-only SELECT over `images`, `objects` and `predictions`.

    \b
    images       a row per image (its hash, pack, label, split, size, lake keys)
    objects      a row per box (its image's hash, category, x, y, w, h, iscrowd)
    predictions  a row per image a labeller scored (model, version, class)
    README (SDK and CLI, "Tables:") lists every column.
    """
    table = _ds().sql_query(sql)
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
@click.option(
    "--allow-pending",
    is_flag=True,
    help="freeze even while the lake has work owed (recorded in subset.json as pending)",
)
@click.option("--json", "as_json", is_flag=True, help="print the subset's record as JSON")
def freeze(key: str, sql: str, allow_pending: bool, as_json: bool) -> None:
    """Freeze the result of SQL as the immutable subset KEY (through Dagster). Refused while the
    lake has work owed (`cvgraph plan`), unless --allow-pending."""
    rec = _ds().freeze_dataset(key, sql, allow_pending=allow_pending)
    if as_json:
        return _print_json(rec)
    click.echo(
        f"subset {key}: {rec['rows']} rows, manifest {rec['manifest_sha256'][:16]}, splits {rec['splits']}"
    )
    if "balance" in rec:
        b = rec["balance"]
        click.echo(
            f"  balance score {b['score']:.3f} over {len(rec['labels']) - ('None' in rec['labels'])} "
            f"label(s) ({b['unlabelled']} unlabelled); boxes {sum(rec['boxes'].values())} "
            f"over {len(rec['boxes'])} categor(ies), {rec['images_without_boxes']} image(s) without"
        )


def _spec_options(command):
    """The spec's flags (``workloads.training.spec.FIELDS``), shared by `train` and `tune`."""
    for option in reversed(
        [
            click.option("--task", type=click.Choice(TASKS), help=_spec_help("task")),
            click.option("--arch", type=click.Choice(ARCHS), help=_spec_help("arch")),
            click.option("--epochs", type=int, help=_spec_help("epochs")),
            click.option("--min-steps", type=int, help=_spec_help("min_steps")),
            click.option("--lr", type=float, help=_spec_help("lr")),
            click.option("--warmup", type=float, help=_spec_help("warmup")),
            click.option("--weight-decay", type=float, help=_spec_help("weight_decay")),
            click.option("--label-smoothing", type=float, help=_spec_help("label_smoothing")),
            click.option("--batch-size", type=int, help=_spec_help("batch_size")),
            click.option("--input-size", type=int, help=_spec_help("input_size")),
            click.option(
                "--variant",
                type=click.Choice(["resized", "edges", "original"]),
                help=_spec_help("variant"),
            ),
            click.option(
                "--augment", type=click.Choice(AUGMENT_LEVELS), help=_spec_help("augment")
            ),
            click.option("--patience", type=int, help=_spec_help("patience")),
            click.option("--width", type=int, help=_spec_help("width")),
            click.option("--seed", type=int, help=_spec_help("seed")),
            click.option("--init-from", help=_spec_help("init_from")),
            click.option(
                "--entry-point",
                type=click.Path(exists=True, dir_okay=False, resolve_path=True),
                help=_spec_help("entry_point"),
            ),
            click.option("--training-image", help=_spec_help("training_image")),
        ]
    ):
        command = option(command)
    return command


@main.command()
@click.argument("key")
@click.option("--subset", help="frozen subset to train on (default: the model's last)")
@_spec_options
@click.option("--json", "as_json", is_flag=True, help="print the model's record as JSON")
def train(key: str, subset: str | None, as_json: bool, **spec) -> None:
    """Train model KEY on a frozen subset (local subprocess or SageMaker, by profile). A flag
    not given is the model's last value, else its default."""
    rec = _ds().train(key, subset, **spec)
    if as_json:
        return _print_json(rec)
    if "test_map" in rec:
        score = f"test mAP {rec['test_map']:.4f}, mAP50 {rec['test_map50']:.4f}"
    else:
        score = f"test accuracy {rec['test_accuracy']:.4f}"
    click.echo(
        f"model {key}: {score} ({rec['counts']['test']} held-out images), mlflow run {rec['mlflow_run_id']}"
    )


@main.command()
@click.argument("key")
@click.option("--subset", help="frozen subset to train on (default: the model's last)")
@click.option("--trials", type=int, required=True, help="trainings in the sweep (2 or more)")
@click.option("--parallel", type=int, default=1, show_default=True, help="trials trained at once")
@click.option(
    "--space",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='the search space, a JSON file {field: [low, high] | {"low", "high", "log"} | '
    '{"choices": [...]}} (default: lr, weight decay, label smoothing, batch size)',
)
@_spec_options
@click.option("--json", "as_json", is_flag=True, help='print {"trials", "best", "version"} as JSON')
def tune(
    key: str,
    subset: str | None,
    trials: int,
    parallel: int,
    space: Path | None,
    as_json: bool,
    **spec,
) -> None:
    """Sweep model KEY: TRIALS trainings (PARALLEL at once) with spec fields drawn from the
    space by Optuna (on AWS: by a SageMaker hyperparameter tuning job); the best on the
    validation split becomes the model's next version. The flags given fix the fields the space
    does not draw."""
    out = _ds().tune(
        key,
        subset,
        trials=trials,
        parallel=parallel,
        space=space.read_text() if space else None,
        **spec,
    )
    if as_json:
        return _print_json(out)
    b = out["best"]
    click.echo(
        f"model {key}: sweep of {len(out['trials'])} trials; kept trial {b['number']} "
        f"({out['objective']} {b['objective']:.4f}, test {out['test_score_name']} "
        f"{out['test_score']:.4f}) as version {out['version']}"
    )
    for t in out["trials"]:
        value = "failed" if t["objective"] is None else f"{t['objective']:.4f}"
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()
        )
        click.echo(f"  trial {t['number']}: {value}  {params}")


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="print the exports record as JSON")
def export(key: str, as_json: bool) -> None:
    """Export model KEY to TorchScript, ONNX and ONNX int8, checked for parity."""
    rec = _ds().export(key)
    if as_json:
        return _print_json(rec)
    for fmt, r in rec["formats"].items():
        if "box_agreement" in r:
            parity = f"max |Δscore| {r['max_abs_error']:.2e}  min IoU {r['min_iou']:.4f}  boxes matched {r['box_agreement']:.3f}"
        else:
            parity = (
                f"max |Δlogit| {r['max_abs_error']:.2e}  top-1 agreement {r['top1_agreement']:.3f}"
            )
        click.echo(f"{fmt:12s} {r['key']}  {r['bytes']} bytes  {parity}")


@main.command()
@click.argument("model")
@click.argument("subset")
@click.option("--json", "as_json", is_flag=True, help="print the evaluation record as JSON")
def evaluate(model: str, subset: str, as_json: bool) -> None:
    """Score MODEL on SUBSET (rows it never trained on): accuracy, per-class F1, confusion matrix,
    worst misclassified; the champion alias moves if it wins."""
    rec = _ds().evaluate(model, subset)
    if as_json:
        return _print_json(rec)
    s = rec["scores"]
    if s.get("task") == "detection":
        click.echo(
            f"{model} v{rec['model_version']} on {subset}: mAP {s['map']:.4f}, mAP50 "
            f"{s['map50']:.4f} over {s['boxes']} boxes in {s['scored']} unseen images "
            f"({s['unknown_category_boxes']} boxes of categories it does not know)"
        )
        for c, ap in s["per_class"].items():
            click.echo(f"  AP {c}: {ap:.4f}")
    else:
        click.echo(
            f"{model} v{rec['model_version']} on {subset}: accuracy {s['accuracy']:.4f}, macro F1 "
            f"{s['macro_f1']:.4f} over {s['scored']} unseen rows ({s['unknown_labels']} with labels it does not know)"
        )
    click.echo(f"  champion: {rec['champion']['reason']}")
    click.echo(f"  pictures: {rec.get('confusion') or rec['pr_curves']}, {rec['worst']}")


@main.command()
@click.argument("key")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "onnx_int8", "onnx_fp16"]),
    default="onnx",
    show_default=True,
    help="which export runs",
)
@click.option(
    "--draw",
    type=click.Path(file_okay=False, path_type=Path),
    help="a detector's: write each image with its boxes drawn to this directory (PNG)",
)
@click.option(
    "--min-score",
    type=click.FloatRange(0, 1),
    help="a detector's: report boxes scoring at least this [default: 0.3]",
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object per image")
def predict(
    key: str,
    images: tuple[Path, ...],
    fmt: str,
    draw: Path | None,
    min_score: float | None,
    as_json: bool,
) -> None:
    """Classify IMAGES (files, or directories of them) with model KEY's export (onnxruntime),
    preprocessed as its preprocess.json says; a detector's boxes are in each image's pixels."""
    rows = _ds().predict(key, list(images), fmt, draw=draw, min_score=min_score)
    if as_json:
        return _print_json(rows)
    for r in rows:
        if "boxes" in r:
            found = ", ".join(
                f"{b['class']} {b['score']:.2f} at ({b['x']:.0f}, {b['y']:.0f}, {b['w']:.0f}x{b['h']:.0f})"
                for b in r["boxes"]
            )
            click.echo(f"{r['image']}: {len(r['boxes'])} box(es){': ' + found if found else ''}")
        else:
            click.echo(f"{r['image']}: {r['class']} ({r['probability']:.3f})")
        if "drawn" in r:
            click.echo(f"  drawn: {r['drawn']}")


@main.command()
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, help="print the pack's predictions as JSON")
def predictions(pack: str, as_json: bool) -> None:
    """List the labeller's classes for PACK's images (CVGRAPH_LABELLER: its champion's ONNX
    export), scoring the pack first if the lake does not hold them yet."""
    out = _ds().predictions(pack)
    if as_json:
        return _print_json(out)
    click.echo(
        f"pack {pack}: {out['images']} images scored by {out['scored_by']}"
        + (f"; {out['failed']} could not be read" if out["failed"] else "")
    )
    for r in out["rows"]:
        label = f"  (label {r['label']})" if r["label"] is not None else ""
        click.echo(f"  {r['member']}: {r['class']} ({r['probability']:.3f}){label}")


@main.command()
@click.argument("kind", type=click.Choice(["pack", "subset", "model", "export"]))
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help='print {"kind", "key", "objects"}')
def forget(kind: str, key: str, as_json: bool) -> None:
    """Remove pack, subset, model or export KEY and its records, refused while something made
    from it is kept. A pack's images leave the tables; originals no other pack holds are deleted."""
    removed = _ds().forget(kind, key)
    if as_json:
        return _print_json({"kind": kind, "key": key, "objects": removed})
    click.echo(f"forgot {kind} {key} ({removed} objects)")


@main.command()
@click.argument("key", required=False)
@click.option(
    "--pack", help="instead: every subset, model, export and evaluation made from this pack"
)
@click.option(
    "--image",
    help="instead: every subset, model, export and evaluation holding this image (sha256)",
)
@click.option("--json", "as_json", is_flag=True, help="print the whole tree as JSON")
@click.option("--prefixes", is_flag=True, help="list every prefix partition and its data versions")
def lineage(
    key: str | None, pack: str | None, image: str | None, as_json: bool, prefixes: bool
) -> None:
    """Lineage of a model/export or subset KEY: export → model → subset → packs → prefix
    versions; or, with --pack or --image, what was made from that pack or image."""
    from cvgraph.errors import InvalidRequest
    from cvgraph.lineage import render
    from cvgraph.listing import render_made_from

    if (key is None) == (pack is None and image is None):
        raise InvalidRequest("give a model or subset KEY, or one of --pack / --image")
    ds = _ds()
    tree = ds.lineage(key) if key else ds.made_from(pack=pack, image=image)
    if as_json:
        _print_json(tree)
    else:
        click.echo(render(tree, prefixes=prefixes) if key else render_made_from(tree))


@main.command(name="ls")
@click.argument("kind", type=click.Choice(["packs", "subsets", "models"]))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object each")
def list_(kind: str, as_json: bool) -> None:
    """List the packs, subsets or models there are, one line each."""
    from cvgraph.listing import render_listing

    rows = _ds().ls(kind)
    if as_json:
        return _print_json(rows)
    click.echo(render_listing(kind, rows))


@main.command()
@click.option(
    "--epochs", type=int, help="train the demo's model this many epochs (default: the spec's)"
)
@click.option(
    "--arch", type=click.Choice(ARCHS), help="the demo model's arch (default: the spec's)"
)
def demo(epochs: int | None, arch: str | None) -> None:
    """Build the demo packs from bundled images and run the whole graph on them."""
    from cvgraph.demo import run_demo

    _quiet()
    sys.exit(run_demo(epochs=epochs, arch=arch))


if __name__ == "__main__":
    main()
