"""pack_predictions: a pack's images scored by the labeller (``CVGRAPH_LABELLER``), the pack's
rows of the ``predictions`` table.

The step reads records only (the pack's, the export's, the scoring's): the scoring itself is
the ``workloads.predictions`` job, a Batch job on AWS or a local process, which reads the pack's
originals and runs the export in onnxruntime. The data version is f(the pack's data version, the
export's ONNX sha256): a new pack, or another champion, is a version the lake has not scored,
and the ``pack_predictions`` sensor asks for it. Labels are never touched: predictions are a
table of their own, beside ``images.label``.
"""

import dagster as dg

from assets.packs import raw_packs
from assets.versioning import md_table, picture, request_metadata
from partitions import pack_partitions_def
from resources.catalog import Catalog
from resources.compute import ImageCompute, WorkloadFailed
from resources.labeller import (
    NO_LABELLER,
    Labeller,
    LabellerExport,
    LabellerRefused,
    predictions_command,
)
from resources.storage import LakeResource
from workloads.lake import get_json
from workloads.layout import PREDICTIONS, pack_keys, prediction_keys, result_key
from workloads.predictions import pack_version, predictions_version, record_scored


def target_version(store, pack: str, export: LabellerExport) -> tuple[str, str]:
    """(the data version ``pack`` is to have when ``export`` scores it, the pack's own data
    version); ``dg.Failure`` if the pack is not ingested."""
    record = get_json(store, pack_keys(pack)["record"])
    if record is None:
        raise dg.Failure(description=f"pack {pack} is not ingested (no committed pack record)")
    own = pack_version(record)
    return predictions_version(own, export.onnx_sha256), own


def scored_entry(record: dict, export: LabellerExport) -> dict:
    """The scored packs' entry of a pack (what the sensor compares): from its scoring record."""
    return {
        "data_version": record["data_version"],
        "pack_version": record["pack_version"],
        "onnx_sha256": record["onnx_sha256"],
        "model": record["model"],
        "version": record["version"],
        "champion": export.champion,
        "images": record["images"],
    }


def _score(context, store, lake: LakeResource, image_compute, export, pack) -> list[dict]:
    """Run the pack's scoring job; the result records of its task (for the requests it made)."""
    run_id = context.run.run_id
    command = predictions_command(lake.url, run_id, export.scoring(pack))
    try:
        image_compute.run_job(context, PREDICTIONS, f"pack {pack}", command)
    except WorkloadFailed as e:
        said = get_json(store, result_key(run_id, PREDICTIONS, pack), {}).get("error")
        raise dg.Failure(description=said or f"predictions of pack {pack}: {e}") from None
    return [get_json(store, result_key(run_id, PREDICTIONS, pack), {})]


def _metadata(record: dict, export: LabellerExport, pictures: dict[str, bytes]) -> dict:
    return {
        "scored_by": export.note,
        "model": record["model"],
        "model_version": record["version"],
        "champion": export.champion,
        "onnx_sha256": record["onnx_sha256"],
        "pack_data_version": record["pack_version"],
        "images": record["images"],
        "failed_images": record["failed"],
        "mean_probability": record["mean_probability"] or 0.0,
        "classes": dg.MetadataValue.md(
            md_table(
                [{"class": c, "images": n} for c, n in record["classes"].items()],
                ["class", "images"],
            )
        ),
        "least_confident": dg.MetadataValue.md(
            md_table(
                [
                    {**r, "probability": f"{r['probability']:.4f}"}
                    for r in record["least_confident"]
                ],
                ["sha256", "class", "probability"],
            )
        ),
        "part": record["part"],
        **{name: picture(name.replace("_", " "), png) for name, png in pictures.items()},
    }


@dg.asset(
    partitions_def=pack_partitions_def,
    deps=[raw_packs],
    code_version="1",
    group_name="labels",
    kinds={"onnx", "parquet"},
    output_required=False,
    description="The pack's images scored by the labeller (CVGRAPH_LABELLER: its champion's ONNX export): rows (sha256, model, version, class, probability, pack) of the `predictions` table, tables/predictions/<pack>.parquet; labels are never touched.",
)
def pack_predictions(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_compute: ImageCompute,
    labeller: Labeller,
    catalog: Catalog,
):
    pack = context.partition_key
    store = lake.lake()
    before = dict(store.counters)
    if not labeller.model:  # no labeller: nothing to score with, and nothing is wrong
        context.log.warning(f"pack {pack} not scored: {NO_LABELLER}")
        return
    try:
        export = labeller.export(store)
    except LabellerRefused as e:
        raise dg.Failure(description=str(e)) from None
    target, _ = target_version(store, pack, export)
    keys = prediction_keys(pack)
    record = get_json(store, keys["record"])
    workers: list[dict] = []
    if record and record["data_version"] == target and store.exists(keys["part"]):
        context.log.info(f"pack {pack} is already scored by {export.note}")
    else:
        context.log.info(f"scoring pack {pack} with {export.note}")
        workers = _score(context, store, lake, image_compute, export, pack)
        record = get_json(store, keys["record"])
        if not record or record["data_version"] != target:
            raise dg.Failure(description=f"predictions of pack {pack}: the job left no record")
    catalog.register_tables()
    pictures = {
        "confidence_histogram": store.get(record["pictures"]["confidence"]),
        "least_confident_images": store.get(record["pictures"]["least_confident"]),
    }
    context.log.info(
        f"pack {pack}: {record['images']} images scored by {export.note}, mean probability "
        f"{record['mean_probability'] or 0:.3f} ({record['failed']} could not be read)"
    )
    yield dg.MaterializeResult(
        metadata={
            **_metadata(record, export, pictures),
            **request_metadata(store.counters.since(before), workers),
        },
        data_version=dg.DataVersion(target),
    )
    # Once Dagster holds the materialisation: what the sensor and `cvgraph predictions` take as
    # done (a step killed before this line leaves the pack owed, and its re-run finds the lake's
    # scoring current and only records it).
    record_scored(store, pack, scored_entry(record, export))
