"""model_evaluations: a trained model scored on a frozen subset, on the rows it never trained on,
with the champion alias moved by the promotion rule."""

import json
from pathlib import Path
from typing import Any  # the mlflow resource: dagster-mlflow's MlFlow, imported when it starts

import dagster as dg

from assets.models import model_version, trained_models
from assets.subsets import frozen_subsets
from assets.versioning import md_table, picture
from partitions import evaluation_partitions_def
from resources.storage import LakeResource
from resources.tracking import discard_run, end_mlflow_on_run_finished, log_evaluation, promote
from workloads.lake import parquet_table
from workloads.layout import evaluation_keys, model_keys, subset_keys
from workloads.staging import staging


def unseen_rows(store, model_record: dict, subset: str) -> list[dict]:
    """The rows of ``subset`` the model never trained on: its test split when it is the model's
    own subset, else every row whose image is not in the train or val split the model learnt from."""
    rows = parquet_table(store.get(subset_keys(subset)["manifest"])).to_pylist()
    if subset == model_record["subset"]:
        return [r for r in rows if r["split"] == "test"]
    own = parquet_table(store.get(subset_keys(model_record["subset"])["manifest"])).to_pylist()
    seen = {r["sha256"] for r in own if r["split"] in ("train", "val")}
    return [r for r in rows if r["sha256"] not in seen]


def _metadata(record: dict, pictures: dict[str, bytes]) -> dict:
    scores = record["scores"]
    common = {
        "model_version": record["model_version"],
        "champion": record["champion"]["reason"],
        **{k: picture(k.replace("_", " "), png) for k, png in pictures.items()},
    }
    if scores.get("task") == "detection":
        per_class = [{"class": c, "AP": round(ap, 4)} for c, ap in scores["per_class"].items()]
        return {
            "map": scores["map"],
            "map50": scores["map50"],
            "map75": scores["map75"],
            "images_scored": scores["scored"],
            "boxes": scores["boxes"],
            "boxes_of_unknown_categories": scores["unknown_category_boxes"],
            "per_class_ap": dg.MetadataValue.md(md_table(per_class, ["class", "AP"])),
            **common,
        }
    per_class = [
        {"class": c, **{k: round(v, 4) for k, v in m.items()}}
        for c, m in scores["per_class"].items()
    ]
    return {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "rows_scored": scores["scored"],
        "rows_with_unknown_labels": scores["unknown_labels"],
        "per_class": dg.MetadataValue.md(
            md_table(per_class, ["class", "precision", "recall", "f1", "support"])
        ),
        **common,
    }


def headline(scores: dict) -> dict:
    """The scores an evaluation's record shows first (a detector's: map, map50, per_class AP)."""
    if scores.get("task") == "detection":
        return {k: scores[k] for k in ("map", "map50", "per_class")}
    return {k: scores[k] for k in ("accuracy", "macro_f1")}


@dg.asset(
    partitions_def=evaluation_partitions_def,
    deps=[
        dg.AssetDep(
            trained_models,
            partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                partition_dimension_name="model"
            ),
        ),
        dg.AssetDep(
            frozen_subsets,
            partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                partition_dimension_name="subset"
            ),
        ),
    ],
    code_version="1",
    group_name="models",
    kinds={"pytorch", "mlflow"},
    description="A trained model scored on a frozen subset's unseen rows: a classifier's accuracy, per-class F1, confusion matrix, worst misclassified; a detector's COCO mAP@[.5:.95], mAP50, AP per class, precision-recall curves, worst images drawn against their boxes; the champion alias moved by the promotion rule (accuracy, mAP).",
    hooks={end_mlflow_on_run_finished},
)
def model_evaluations(
    context: dg.AssetExecutionContext, lake: LakeResource, mlflow: dg.ResourceParam[Any]
) -> dg.MaterializeResult:
    # torch loads here, not with the code location
    from workloads.training.evaluate import (
        confusion_png,
        pr_png,
        score,
        score_detector,
        score_onnx,
        worst_png,
    )
    from workloads.training.spec import SCORE, SCORE_NAME, task_of

    dims = context.partition_key.keys_by_dimension
    model, subset = dims["model"], dims["subset"]
    store = lake.lake()
    keys = evaluation_keys(model, subset)
    model_record = json.loads(store.get(model_keys(model)["record"]))
    subset_record = json.loads(store.get(subset_keys(subset)["record"]))
    prior = json.loads(store.get(keys["record"])) if store.exists(keys["record"]) else None
    if (
        prior
        and prior["model_sha256"] == model_record["model_sha256"]
        and prior["subset_manifest_sha256"] == subset_record["manifest_sha256"]
    ):
        context.log.info(f"{model} v{prior['model_version']} is already scored on {subset}")
        discard_run(mlflow)
        record = prior
    else:
        rows = unseen_rows(store, model_record, subset)
        with staging(store, "evaluate", on_sweep=lambda s: context.log.info(str(s))) as tmp:
            detector = task_of(model_record) == "detection"
            if model_record.get("format") == "onnx":  # an entry point's (workloads.training.byo)
                path = Path(tmp) / "model.onnx"
                path.write_bytes(store.get(model_record["weights"]))
                scores, worst = score_onnx(str(path), model_record, rows, store.get)
            else:
                path = Path(tmp) / "model.pt"
                path.write_bytes(store.get(model_keys(model)["model"]))
                scores, worst = (score_detector if detector else score)(str(path), rows, store.get)
            version = model_version(mlflow, store, model_record)
            title = f"{model} v{version} on {subset}"
            pngs = {
                "confusion" if not detector else "pr_curves": (
                    pr_png(scores, title) if detector else confusion_png(scores, title)
                ),
                "worst": worst_png(worst, title),
            }
            files = []
            for name, png in pngs.items():
                store.put(keys[name], png)
                files.append(str(Path(tmp) / f"{name}.png"))
                Path(files[-1]).write_bytes(png)
            (Path(tmp) / "evaluation.json").write_text(json.dumps(scores, indent=2))
            run_id = log_evaluation(
                mlflow, model, version, subset, scores, [*files, str(Path(tmp) / "evaluation.json")]
            )
        metric = SCORE[task_of(model_record)]
        champion = promote(mlflow, model, version, subset, scores[metric], metric=metric)
        context.log.info(
            f"{model} v{version} on {subset}: {SCORE_NAME[metric]} {scores[metric]:.4f}; champion: {champion['reason']}"
        )
        record = {
            "model": model,
            "model_version": version,
            "model_sha256": model_record["model_sha256"],
            "subset": subset,
            "subset_manifest_sha256": subset_record["manifest_sha256"],
            **headline(scores),
            "scores": scores,
            "champion": champion,
            "mlflow_run_id": run_id,
            **({"pr_curves": keys["pr_curves"]} if detector else {"confusion": keys["confusion"]}),
            "worst": keys["worst"],
            "dagster_run_id": context.run.run_id,
        }
        store.put(keys["record"], json.dumps(record, indent=2, sort_keys=True).encode())
    if record["scores"].get("task") == "detection":
        pictures = {
            "precision_recall": store.get(keys["pr_curves"]),
            "worst_images": store.get(keys["worst"]),
        }
    else:
        pictures = {
            "confusion_matrix": store.get(keys["confusion"]),
            "worst_misclassified": store.get(keys["worst"]),
        }
    return dg.MaterializeResult(
        metadata=_metadata(record, pictures),
        data_version=dg.DataVersion(
            f"{record['model_sha256'][:12]}{record['subset_manifest_sha256'][:12]}"
        ),
    )
