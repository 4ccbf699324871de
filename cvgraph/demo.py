"""``cvgraph demo``: real images through every asset, on this machine, then a summary."""

from __future__ import annotations

import time

import click

from workloads.layout import model_keys

DIGITS_SUBSET = "digits_v1"
DIGITS_SQL = "SELECT * FROM images WHERE pack_id = 'digits' AND label IS NOT NULL"
DIGITS_MODEL = "digits_cnn"
MIN_ACCURACY = 0.90
SHAPES_SUBSET = "shapes_v1"
SHAPES_SQL = "SELECT * FROM images WHERE pack_id = 'shapes'"
SHAPES_MODEL = "shapes_detector"
MIN_MAP50 = 0.70  # the detector's test mAP@0.5 with the defaults (not checked with --epochs)


def detector_lines(subset: dict, model: dict, exports: dict, evaluation: dict) -> list[str]:
    """The summary's lines of the detector: its subset, mAP, AP per class, exports."""
    s = evaluation["scores"]
    return [
        f"subset {SHAPES_SUBSET}:     {subset['rows']} rows, {sum(subset['boxes'].values())} boxes "
        f"({', '.join(f'{k} {v}' for k, v in subset['boxes'].items())})",
        f"model {SHAPES_MODEL}: test mAP {model['test_map']:.4f}, mAP50 {model['test_map50']:.4f} "
        f"on {model['counts']['test']} held-out images ({model['spec']['arch']} CenterNet, "
        f"{model['spec']['input_size']} px)",
        f"evaluation:           mAP {s['map']:.4f}, mAP50 {s['map50']:.4f} over {s['boxes']} boxes; "
        + ", ".join(f"AP {c} {ap:.3f}" for c, ap in s["per_class"].items()),
        "detector exports:",
        *(
            f"    {r['key']:40s} {r['bytes']:>8d} bytes  max |Δscore| {r['max_abs_error']:.2e}  min IoU {r['min_iou']:.4f}  boxes matched {r['box_agreement']:.3f}"
            for r in exports["formats"].values()
        ),
        f"detector pictures:    {evaluation['pr_curves']}, {evaluation['worst']}",
    ]


def summary(
    ds,
    pack_ids: list[str],
    subset: dict,
    model: dict,
    exports: dict,
    evaluation: dict,
    detector: list[str] = (),
) -> str:
    """What the demo made, where it is, and what to look at next."""
    from assets.versioning import lake_merkle_root
    from partitions import hash_prefix_partitions_def

    reports = [ds.pack_report(p) for p in pack_ids]
    materialised = {
        k.to_user_string(): len(ds.instance.get_materialized_partitions(k))
        for k in ds.definitions.resolve_asset_graph().get_all_asset_keys()
        if ds.definitions.resolve_assets_def(k).partitions_def == hash_prefix_partitions_def
    }
    root, _ = lake_merkle_root(ds.lake, "image_tables")
    lines = [
        "",
        "cvgraph demo summary",
        "====================",
        f"packs:                {', '.join(r['pack_id'] for r in reports)}",
        f"images accepted:      {sum(r['accepted'] for r in reports)}  ("
        + ", ".join(f"{r['pack_id']} {r['accepted']}" for r in reports)
        + ")",
        f"images duplicate:     {sum(r['duplicates'] for r in reports)}",
        f"members rejected:     {sum(len(r['rejected']) for r in reports)}"
        + "".join(
            f"\n    {r['pack_id']}/{x['member']}: {x['reason']}"
            for r in reports
            for x in r["rejected"]
        ),
        "prefix partitions:    "
        + ", ".join(f"{k} {v}/256" for k, v in sorted(materialised.items())),
        f"tables merkle root:   {root}",
        f"subset {DIGITS_SUBSET}:     {subset['rows']} rows, manifest sha256 {subset['manifest_sha256'][:16]}, splits {subset['splits']}",
        f"balance score:        {subset['balance']['score']:.4f} (entropy of the label counts / ln {len(subset['labels'])})",
        f"model {DIGITS_MODEL}:     test accuracy {model['test_accuracy']:.4f} on {model['counts']['test']} held-out images (mlflow run {model['mlflow_run_id'][:12]})",
        f"registered model:     {DIGITS_MODEL} version {model['mlflow_model_version']} (MLflow registry)",
        f"evaluation:           accuracy {evaluation['scores']['accuracy']:.4f}, macro F1 "
        f"{evaluation['scores']['macro_f1']:.4f} on {evaluation['scores']['scored']} unseen rows; "
        f"champion: {evaluation['champion']['reason']}",
        "exports:",
        *(
            f"    {r['key']:40s} {r['bytes']:>8d} bytes  max |Δlogit| {r['max_abs_error']:.2e}  top-1 agreement {r['top1_agreement']:.3f}"
            for r in exports["formats"].values()
        ),
        f"pictures:             {ds.lake_url}/{subset['label_plot']}, {ds.lake_url}/{model_keys(DIGITS_MODEL)['curves']}",
        *detector,
        f"next:                 make ui  (the same Dagster instance)  ·  cvgraph lineage {DIGITS_MODEL}",
    ]
    return "\n".join(lines)


def run_demo(epochs: int | None = None, arch: str | None = None) -> int:
    from cvgraph.demo_packs import build_demo_packs
    from cvgraph.sdk import Datasets
    from cvgraph.terminal import echo_ingest, echo_range
    from orchestration.settings import home

    t0 = time.perf_counter()

    def step(msg: str) -> None:
        click.secho(f"[{time.perf_counter() - t0:6.1f}s] {msg}", fg="cyan")

    ds = Datasets()
    step(f"CVGRAPH_HOME={home()}  lake={ds.lake_url}")
    step("building demo packs from scikit-learn / scikit-image sample data")
    packs = build_demo_packs(home() / "demo-packs")
    for name, path in packs.items():
        up = ds.upload(path, name)
        step(
            f"{'uploaded' if up.uploaded else 'unchanged'} {up.key} ({path.stat().st_size / 1e6:.1f} MB)"
        )
    step("sensor tick: new zips under incoming/ → packs partitions → ingest runs")
    ds.tick_incoming(on_run=echo_ingest)
    step("automation: new packs → raw_images → resized_images + edge_maps → image_tables")
    ds.sync(on_run=echo_range)
    step(f"freezing subset {DIGITS_SUBSET} by SQL")
    subset = ds.freeze_dataset(DIGITS_SUBSET, DIGITS_SQL)
    given = {k: v for k, v in {"epochs": epochs, "arch": arch}.items() if v is not None}
    how = ", ".join(f"{k} {v}" for k, v in given.items()) or "the defaults"
    step(f"training {DIGITS_MODEL} ({how}) on {DIGITS_SUBSET}")
    model = ds.train(DIGITS_MODEL, DIGITS_SUBSET, **given)
    step(
        "exporting TorchScript, ONNX, ONNX int8, ONNX float16 and checking parity with onnxruntime"
    )
    exports = ds.export(DIGITS_MODEL)
    step(f"evaluating {DIGITS_MODEL} on the held-out rows of {DIGITS_SUBSET}")
    evaluation = ds.evaluate(DIGITS_MODEL, DIGITS_SUBSET)
    step(f"freezing subset {SHAPES_SUBSET} (the shapes pack's boxes) by SQL")
    shapes = ds.freeze_dataset(SHAPES_SUBSET, SHAPES_SQL)
    quick = {"epochs": epochs} if epochs is not None else {}
    step(
        f"training {SHAPES_MODEL} (task detection, {'epochs ' + str(epochs) if quick else 'the defaults'}) on {SHAPES_SUBSET}"
    )
    detector = ds.train(SHAPES_MODEL, SHAPES_SUBSET, task="detection", **quick)
    step(f"exporting {SHAPES_MODEL} (boxes decoded in the graph) and checking parity")
    detector_exports = ds.export(SHAPES_MODEL)
    step(f"evaluating {SHAPES_MODEL} on the held-out rows of {SHAPES_SUBSET} (COCO mAP)")
    detector_evaluation = ds.evaluate(SHAPES_MODEL, SHAPES_SUBSET)

    lines = detector_lines(shapes, detector, detector_exports, detector_evaluation)
    click.echo(summary(ds, list(packs), subset, model, exports, evaluation, lines))
    click.echo(f"done in {time.perf_counter() - t0:.1f}s")
    failures = []
    if model["test_accuracy"] < MIN_ACCURACY:
        failures.append(f"test accuracy {model['test_accuracy']:.4f} is below {MIN_ACCURACY}")
    if not quick and detector["test_map50"] < MIN_MAP50:
        failures.append(f"detector test mAP50 {detector['test_map50']:.4f} is below {MIN_MAP50}")
    for failure in failures:
        click.secho(failure, fg="red", err=True)
    return 0 if not failures else 1


__all__ = ["run_demo"]
