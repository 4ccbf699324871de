"""The whole graph, end to end, in the suite's temporary CVGRAPH_HOME: the demo twice, then
the SDK, CLI and lineage against what it made. Asserts content, not just success."""

import io
import json
import math
import re

import cv2
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from assets.versioning import asset_records
from cvgraph.cli import main as cli
from cvgraph.demo import DIGITS_MODEL, DIGITS_SUBSET
from cvgraph.demo_packs import sample_image, zip_bytes
from workloads.lake import parquet_table
from workloads.versions import HASH_PREFIXES, sha256_hex, table_hash

VERSION_TAGS = {  # what a registered version was made from (exports and evaluations add more)
    f"cvgraph.{k}"
    for k in (
        "subset",
        "subset_manifest_sha256",
        "input_merkle_root",
        "dagster_run_id",
        "training_job",
    )
}
PREFIX_ASSETS = ("raw_images", "resized_images", "edge_maps", "image_tables")
LAKE_AREAS = (
    "raw/",
    "index/",
    "resized/",
    "edges/",
    "tables/",
    "packs/",
    "subsets/",
    "models/",
    "exports/",
    "_versions/",
)


def lake_snapshot(lake) -> dict[str, str]:
    return {o.key: sha256_hex(lake.get(o.key)) for area in LAKE_AREAS for o in lake.list(area)}


def dagster_state(instance) -> dict:
    """Latest data version of every asset partition, and how many materialisations exist."""
    import dagster as dg

    state = {}
    for asset in (
        "raw_packs",
        *PREFIX_ASSETS,
        "frozen_subsets",
        "trained_models",
        "exported_models",
    ):
        key = dg.AssetKey(asset)
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key), limit=10000
        ).records
        latest = {}
        for r in sorted(records, key=lambda r: r.storage_id):
            mat = r.event_log_entry.asset_materialization
            latest[mat.partition] = mat.tags.get("dagster/data_version")
        state[asset] = {"versions": latest, "count": len(records)}
    return state


@pytest.fixture(scope="module")
def demo():
    from cvgraph.demo import run_demo
    from cvgraph.sdk import Datasets

    assert run_demo(epochs=6, arch="small_cnn") == 0
    ds = Datasets()
    first = {"lake": lake_snapshot(ds.lake), "dagster": dagster_state(ds.instance)}
    assert run_demo(epochs=6, arch="small_cnn") == 0
    second = {"lake": lake_snapshot(ds.lake), "dagster": dagster_state(ds.instance)}
    return ds, first, second


def test_packs_counts_and_rejects(demo):
    ds, _, _ = demo
    digits = json.loads(ds.lake.get("packs/digits/pack.json"))
    photos = json.loads(ds.lake.get("packs/photos/pack.json"))
    assert (digits["accepted"], digits["duplicates"], digits["rejected"]) == (1797, 0, [])
    assert (photos["accepted"], photos["duplicates"], photos["skipped"]) == (14, 1, 1)
    assert photos["rejected"] == [{"member": "notes.txt", "reason": "not an image: extension .txt"}]
    assert len(list(ds.lake.list("raw/"))) == 2111


def test_every_prefix_partition_materialised_with_exact_versions(demo):
    ds, first, _ = demo
    for asset in PREFIX_ASSETS:
        assert set(first["dagster"][asset]["versions"]) == set(HASH_PREFIXES), asset
        assert set(asset_records(ds.lake, asset)) == set(HASH_PREFIXES)
    records = {a: asset_records(ds.lake, a) for a in PREFIX_ASSETS}
    assert {a: sum(r["images"] for r in records[a].values()) for a in PREFIX_ASSETS} == {
        a: 2111 for a in PREFIX_ASSETS
    }
    # prefixes with more than CVGRAPH_SHARD_IMAGES (8 in the suite) images ran as shards, then merged
    shards = {p: r.get("shards", 1) for p, r in records["resized_images"].items()}
    raw = {p: r["images"] for p, r in records["raw_images"].items()}
    assert {p for p, n in shards.items() if n > 1} == {p for p, n in raw.items() if n > 8} != set()
    assert not [k for k in ds.lake.keys("index/") if ".shard-" in k]
    assert len(list(ds.lake.list("resized/"))) == len(list(ds.lake.list("edges/"))) == 2111
    some = next(iter(ds.lake.list("resized/"))).key
    assert cv2.imdecode(np.frombuffer(ds.lake.get(some), np.uint8), cv2.IMREAD_COLOR).shape == (
        64,
        64,
        3,
    )


def test_asset_checks_passed(demo):
    import dagster as dg

    ds, _, _ = demo
    for asset, check in [
        ("resized_images", "complete"),
        ("edge_maps", "complete"),
        ("image_tables", "rows_match_images"),
        ("frozen_subsets", "manifest_intact"),
        ("exported_models", "parity"),
        ("raw_packs", "manifest_matches_record"),
    ]:
        key = dg.AssetCheckKey(dg.AssetKey(asset), check)
        rec = ds.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert rec.status.value == "SUCCEEDED", (asset, check, rec.status)


def test_second_demo_changes_no_data_version_and_duplicates_nothing(demo):
    _, first, second = demo
    assert second["lake"] == first["lake"]
    for asset, state in first["dagster"].items():
        assert second["dagster"][asset]["versions"] == state["versions"], asset
    for asset in ("raw_packs", *PREFIX_ASSETS):  # nothing re-ran upstream of the subset
        assert second["dagster"][asset]["count"] == first["dagster"][asset]["count"], asset


def test_a_range_with_nothing_to_do_reads_one_record_per_asset_and_writes_nothing(demo):
    """Untouched prefixes are nearly free: a 256-prefix run of the four prefix assets with no pack
    pending reads each input's and its own ``_versions`` once (one object holds all 256 prefixes'
    records), starts no task, writes nothing, and keeps every partition's data version."""
    import dagster as dg

    ds, first, _ = demo
    result = ds.materialize([dg.AssetKey(a) for a in PREFIX_ASSETS], partition_range=("00", "ff"))
    requests = {}
    for event in result.get_asset_materialization_events():
        meta = event.materialization.metadata
        requests[event.asset_key.to_user_string()] = {
            k: v
            for k, v in meta["lake_requests_orchestrator"].value.items()
            if not k.startswith("bytes")
        }
        assert (
            meta["prefixes_in_run"].value == 256
            and meta["prefixes_with_work"].value == 0
            and meta["lake_requests_workers"].value == {}
        )
    # raw_images: the pending markers' listing and its own records; the stages: raw + their own two
    # (one step, reported once); the tables: its markers' listing, three inputs and its own
    assert requests == {
        "raw_images": {"list": 1, "get": 1},
        "resized_images": {"get": 3},
        "edge_maps": {},
        "image_tables": {"list": 1, "get": 4},
    }
    assert lake_snapshot(ds.lake) == first["lake"]
    state = dagster_state(ds.instance)
    assert all(state[a]["versions"] == first["dagster"][a]["versions"] for a in PREFIX_ASSETS)
    # The daemon evaluates automation continuously; one evaluation here takes this run in, so a pack
    # ingested later is not seen in the same window as these materialisations (which would reset it).
    assert ds.sync() == []


def test_tables_and_sql(demo):
    ds, _, _ = demo
    assert ds.sql_query("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 2111}]
    assert ds.sql_query("SELECT count(*) AS n FROM objects").to_pylist() == [{"n": 747}]
    labels = ds.sql_query(
        "SELECT label, count(*) AS n FROM images WHERE pack_id = 'digits' GROUP BY label ORDER BY label"
    ).to_pylist()
    assert [r["label"] for r in labels] == [str(i) for i in range(10)] and sum(
        r["n"] for r in labels
    ) == 1797
    cat = ds.sql_query(
        "SELECT i.member, o.category, o.w FROM objects o JOIN images i USING (sha256) WHERE o.category = 'cat'"
    ).to_pylist()
    assert cat == [{"member": "skimage/chelsea.png", "category": "cat", "w": 300.0}]
    china = sha256_hex(sample_image("china.jpg"))
    dup = ds.sql_query(
        f"SELECT packs, member, label FROM images WHERE sha256 = '{china}'"
    ).to_pylist()
    # stored once; the COCO label beats the copy's folder name
    assert dup == [{"packs": ["photos"], "member": "copies/china (1).jpg", "label": "building"}]


def test_subset_is_zero_copy_immutable_and_verified(demo):
    from cvgraph.sdk import FreezeRefused

    ds, _, _ = demo
    rec = ds.subset(DIGITS_SUBSET)
    manifest = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
    assert rec["rows"] == manifest.num_rows == 1797
    assert (
        rec["manifest_sha256"]
        == sha256_hex(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
        and rec["manifest_hash_of"] == "object"
    )
    assert rec["packs"] == ["digits"]
    assert set(manifest["resized_key"].to_pylist()) <= {o.key for o in ds.lake.list("resized/")}
    assert sorted(manifest["sha256"].to_pylist()) == manifest["sha256"].to_pylist()
    assert sum(rec["splits"].values()) == 1797
    with pytest.raises(FreezeRefused, match="different query"):
        ds.freeze_dataset(DIGITS_SUBSET, "SELECT * FROM images WHERE label = '3'")
    with pytest.raises(FreezeRefused, match="SELECT"):
        ds.freeze_dataset("evil", "DROP TABLE images")
    assert ds.freeze_dataset(DIGITS_SUBSET, rec["sql"])["manifest_sha256"] == rec["manifest_sha256"]
    # the balance score: the entropy of the ten digits' counts over ln 10
    counts = list(rec["labels"].values())
    entropy = -sum(n / 1797 * math.log(n / 1797) for n in counts)
    assert rec["balance"] == {
        "score": pytest.approx(entropy / math.log(10), abs=1e-6),
        "labelled": 1797,
        "unlabelled": 0,
    }
    assert 0.999 < rec["balance"]["score"] < 1  # sklearn's digits are nearly even
    assert rec["boxes"] == {} and rec["images_without_boxes"] == 1797


def latest_metadata(instance, asset: str, partition: str) -> dict:
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return records[0].event_log_entry.asset_materialization.metadata


def shown_png(value) -> bytes:
    """The PNG a Markdown metadata value shows inline."""
    import base64

    prefix = "data:image/png;base64,"
    return base64.b64decode(value.value.split(prefix, 1)[1].rstrip(")"))


def test_pictures_are_shown_in_the_dagster_ui(demo):
    """Label balance and training curves are images in the assets' metadata, the lake's bytes."""
    ds, _, _ = demo
    subset = latest_metadata(ds.instance, "frozen_subsets", DIGITS_SUBSET)
    assert subset["label_balance"].value.startswith("![label balance](data:image/png;base64,")
    assert shown_png(subset["label_balance"]) == ds.lake.get(f"subsets/{DIGITS_SUBSET}/labels.png")
    assert subset["balance_score"].value == ds.subset(DIGITS_SUBSET)["balance"]["score"]
    model = latest_metadata(ds.instance, "trained_models", DIGITS_MODEL)
    assert shown_png(model["training_curves"]) == ds.lake.get(f"models/{DIGITS_MODEL}/curves.png")


def test_frozen_subset_dataset_through_a_dataloader(demo):
    from cvgraph.torch import FrozenSubsetDataset, SubsetIntegrityError

    ds, _, _ = demo
    rec = ds.subset(DIGITS_SUBSET)
    train = FrozenSubsetDataset(DIGITS_SUBSET, variant="resized", split="train")
    assert len(train) == rec["splits"]["train"] and train.classes == [str(i) for i in range(10)]
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=16)))
    assert (
        x.shape == (16, 3, 64, 64)
        and x.dtype == torch.float32
        and 0 <= int(y.min())
        and int(y.max()) <= 9
    )
    edges = FrozenSubsetDataset(
        DIGITS_SUBSET, variant="edges", split="test", transform=lambda im: im.shape
    )
    assert len(edges) == rec["splits"]["test"] and edges[0][0] == (64, 64, 3)
    original = FrozenSubsetDataset(DIGITS_SUBSET, variant="original", split="val")
    assert original[0][0].shape == (3, 96, 96)
    # a frozen subset whose manifest was changed refuses to load
    ds.freeze_dataset("tamper_v1", "SELECT * FROM images WHERE label = '7'")
    table = parquet_table(ds.lake.get("subsets/tamper_v1/manifest.parquet"))
    buf = io.BytesIO()
    pq.write_table(table.slice(1), buf)
    ds.lake.put("subsets/tamper_v1/manifest.parquet", buf.getvalue())
    with pytest.raises(SubsetIntegrityError, match="manifest was changed"):
        FrozenSubsetDataset("tamper_v1")
    # the same rows re-encoded are a different object: refused too (a manifest is frozen as bytes)
    ds.freeze_dataset("reencoded", "SELECT * FROM images WHERE label = '5'")
    rows = parquet_table(ds.lake.get("subsets/reencoded/manifest.parquet"))
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd")
    ds.lake.put("subsets/reencoded/manifest.parquet", buf.getvalue())
    with pytest.raises(SubsetIntegrityError, match="manifest was changed"):
        FrozenSubsetDataset("reencoded")
    # a subset recorded before manifests were hashed as objects (a hash of its rows) still loads
    old = json.loads(ds.lake.get("subsets/reencoded/subset.json"))
    del old["manifest_hash_of"]
    old["manifest_sha256"] = table_hash(rows)
    ds.lake.put("subsets/reencoded/subset.json", json.dumps(old).encode())
    assert (
        len(FrozenSubsetDataset("reencoded", split=None))
        == rows.num_rows
        == ds.subset("reencoded")["rows"]
    )
    # re-materialising a subset checks every listed variant is still in the lake
    from assets.subsets import frozen_subsets

    gone = rows["edges_key"][3].as_py()
    kept = ds.lake.get(gone)
    ds.lake.delete(gone)
    try:
        result = ds.materialize(
            [frozen_subsets.key], partition_key="reencoded", raise_on_error=False
        )
        (check,) = result.get_asset_check_evaluations()
        assert (
            not check.passed
            and check.metadata["missing_files"].value == 1
            and gone in check.metadata["first_missing"].value
        )
    finally:
        ds.lake.put(gone, kept)
    (check,) = ds.materialize(
        [frozen_subsets.key], partition_key="reencoded"
    ).get_asset_check_evaluations()
    assert check.passed and check.metadata["missing_files"].value == 0
    # a subset image whose bytes were changed refuses to load
    key = train.rows[0]["resized_key"]
    good = ds.lake.get(key)
    ds.lake.put(key, good[:-10] + b"0123456789")
    try:
        with pytest.raises(SubsetIntegrityError, match=f"{key} was changed after freezing"):
            train[0]
        assert train[1][0].shape == (3, 64, 64)  # the others still load
    finally:
        ds.lake.put(key, good)


def test_model_accuracy_mlflow_and_export_parity(demo):
    import mlflow

    from orchestration.settings import mlflow_tracking_uri

    ds, _, _ = demo
    model = json.loads(ds.lake.get(f"models/{DIGITS_MODEL}/model.json"))
    assert model["test_accuracy"] >= 0.90
    assert model["subset_manifest_sha256"] == ds.subset(DIGITS_SUBSET)["manifest_sha256"]
    assert model["model_sha256"] == sha256_hex(ds.lake.get(f"models/{DIGITS_MODEL}/model.pt"))
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    run = client.get_run(model["mlflow_run_id"])
    assert run.data.tags["cvgraph.subset_hash"] == model["subset_manifest_sha256"]
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 6
    assert run.data.params["epochs"] == "6"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "model.pt",
        "metrics.json",
        "curves.png",
    }
    assert ds.lake.get(f"models/{DIGITS_MODEL}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # dagster-mlflow's run of the training's Dagster run; the demo's second run trained nothing
    # and left no MLflow run behind
    assert run.data.tags["dagster_run_id"] == model["dagster_run_id"]
    runs = client.search_runs([run.info.experiment_id], f"tags.`cvgraph.model` = '{DIGITS_MODEL}'")
    assert [r.info.run_id for r in runs if "cvgraph.spec_hash" in r.data.tags] == [run.info.run_id]
    # the registry: the training is version 1 of the registered model named after the key, with
    # what it was made from in its tags; its exports are logged with it
    version = client.get_model_version(DIGITS_MODEL, model["mlflow_model_version"])
    assert (str(version.version), version.run_id) == ("1", run.info.run_id)
    subset = ds.subset(DIGITS_SUBSET)
    assert {k: v for k, v in version.tags.items() if k in VERSION_TAGS} == {
        "cvgraph.subset": DIGITS_SUBSET,
        "cvgraph.subset_manifest_sha256": subset["manifest_sha256"],
        "cvgraph.input_merkle_root": subset["input_merkle_root"],
        "cvgraph.dagster_run_id": model["dagster_run_id"],
        "cvgraph.training_job": model["training_job"],
    }
    exports_run = version.tags["cvgraph.exports_run"]
    exported = json.loads(ds.lake.get(f"exports/{DIGITS_MODEL}/exports.json"))
    assert (exported["model_version"], exported["mlflow_run_id"]) == ("1", exports_run)
    logged = {a.path for a in client.list_artifacts(exports_run, "onnx")}
    assert logged == {"onnx/model.onnx"}
    onnx = client.download_artifacts(exports_run, "onnx/model.onnx")
    assert sha256_hex(open(onnx, "rb").read()) == exported["formats"]["onnx"]["sha256"]
    # from the version's tags alone, back to the packs
    tree = ds.lineage(version.tags["cvgraph.subset"])
    assert tree["subset"]["manifest_sha256"] == version.tags["cvgraph.subset_manifest_sha256"]
    assert [p["pack_id"] for p in tree["packs"]] == ["digits"]
    # the training entry's log lines reached the Dagster run through Pipes
    lines = [e.user_message for e in ds.instance.all_logs(model["dagster_run_id"])]
    assert any(m.startswith("epoch=6 ") for m in lines) and any(
        m.startswith("test_accuracy") or "test_accuracy=" in m for m in lines
    )
    exports = json.loads(ds.lake.get(f"exports/{DIGITS_MODEL}/exports.json"))
    assert set(exports["formats"]) == {"torchscript", "onnx", "onnx_int8", "onnx_fp16"}
    assert exports["formats"]["onnx"]["max_abs_error"] < 1e-3
    assert exports["formats"]["onnx_fp16"]["top1_agreement"] >= 0.99
    # independent check: the ONNX file and the TorchScript file agree on real test images,
    # made into inputs here as preprocess.json says (RGB, area resize, per-channel mean and std)
    pre = json.loads(ds.lake.get(f"exports/{DIGITS_MODEL}/preprocess.json"))
    test = [
        r
        for r in parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet")).to_pylist()
        if r["split"] == "test"
    ][:32]
    x = np.stack([_as_input(ds.lake.get(r["resized_key"]), pre) for r in test])
    sess = ort.InferenceSession(ds.lake.uri(f"exports/{DIGITS_MODEL}/onnx/model.onnx"))
    onnx_logits = sess.run(None, {"image": x})[0]
    ts = torch.jit.load(ds.lake.uri(f"exports/{DIGITS_MODEL}/torchscript/model.pt"))
    ts_logits = ts(torch.from_numpy(x)).detach().numpy()
    assert np.abs(onnx_logits - ts_logits).max() < 1e-3
    labels = [model["classes"].index(r["label"]) for r in test]
    assert np.mean(onnx_logits.argmax(1) == np.array(labels)) >= 0.85


def _as_input(data: bytes, pre: dict) -> np.ndarray:
    """An image file's bytes as ``preprocess.json``'s input (C, S, S), written out here with
    OpenCV and NumPy alone."""
    inp, size = pre["input"], pre["input_size"]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if inp["channels"] == 3 else cv2.COLOR_BGR2GRAY)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, -1)
    x = (img.astype(np.float32) / 255 - np.float32(inp["mean"])) / np.float32(inp["std"])
    return x.transpose(2, 0, 1).astype(np.float32)


def test_lineage_cli(demo):
    ds, _, _ = demo
    out = CliRunner().invoke(cli, ["lineage", DIGITS_MODEL, "--json"])
    assert out.exit_code == 0, out.output
    tree = json.loads(out.stdout)
    assert tree["export"]["formats"]["onnx"]["key"] == f"exports/{DIGITS_MODEL}/onnx/model.onnx"
    assert tree["model"]["key"] == DIGITS_MODEL and tree["model"]["dagster"]["run_id"]
    assert tree["subset"]["sql"].startswith("SELECT * FROM images WHERE pack_id = 'digits'")
    manifest = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
    assert set(tree["prefixes"]) == set(manifest["prefix"].to_pylist())
    assert all(set(v) == set(PREFIX_ASSETS) for v in tree["prefixes"].values())
    assert [p["pack_id"] for p in tree["packs"]] == ["digits"]
    text = CliRunner().invoke(cli, ["lineage", DIGITS_MODEL])
    assert text.exit_code == 0
    for needle in (
        "export digits_cnn",
        "└─ model digits_cnn",
        "└─ subset digits_v1",
        "prefix partitions",
        "digits  zip sha256",
    ):
        assert needle in text.output
    # short by default, the packs before the prefixes; --prefixes adds a line per prefix
    lines = text.output.splitlines()
    assert len(lines) < 15 and not any(line.strip().startswith("00  ") for line in lines)
    assert text.output.index("└─ packs") < text.output.index("prefix partitions")
    full = CliRunner().invoke(cli, ["lineage", DIGITS_MODEL, "--prefixes"]).output.splitlines()
    assert len(full) == len(lines) + len(tree["prefixes"])
    assert CliRunner().invoke(cli, ["lineage", "nope"]).exit_code != 0


def test_the_sdk_does_what_the_cli_does_and_names_what_went_wrong(demo, tmp_path):
    """A notebook has every workflow the CLI has (upload, ingest, pack report, lineage, ...), and a
    user's mistake is an SDK exception with one line, which the CLI prints without a traceback."""
    from cvgraph import CvgraphError, PackNotIngested, UnknownKey

    ds, _, _ = demo
    up = ds.upload(ds.lake.path("incoming/digits.zip"), "digits")
    assert (up.key, up.pack_id, up.uploaded) == (
        "incoming/digits.zip",
        "digits",
        False,
    )  # the same bytes: nothing to do
    assert ds.pack_report("digits") == {
        "pack_id": "digits",
        "accepted": 1797,
        "duplicates": 0,
        "rejected": [],
        # scikit-learn's digits per class, each from its folder
        "labels": dict(zip("0123456789", [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])),
        "boxes": {"accepted": 0, "rejected": 0},
        "label_conflicts": [],
    }
    assert ds.lineage(DIGITS_MODEL)["model"]["key"] == DIGITS_MODEL
    with pytest.raises(UnknownKey, match="'nope' is neither a trained model nor a frozen subset"):
        ds.lineage("nope")
    with pytest.raises(UnknownKey, match="no ingested pack 'nope'"):
        ds.pack_report("nope")
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        PackNotIngested, match="pack broken .* was not ingested: .*not a readable zip"
    ) as e:
        ds.ingest(bad)
    assert e.value.pack_id == "broken" and isinstance(e.value, CvgraphError)
    out = CliRunner().invoke(cli, ["lineage", "nope"])
    assert (
        out.exit_code == 1
        and out.output == "Error: 'nope' is neither a trained model nor a frozen subset\n"
    )
    out = CliRunner().invoke(cli, ["train", "m2", "--subset", "no_such_subset", "--epochs", "1"])
    assert (
        out.exit_code == 1
        and out.output.startswith("Error: ")
        and "no_such_subset" in out.output
        and "Traceback" not in out.output
    )
    assert len(out.output.strip().splitlines()) == 1, out.output


def test_cli_ingest_query_and_bad_packs(demo, tmp_path):
    ds, _, _ = demo
    pack = tmp_path / "extra.zip"
    pack.write_bytes(
        zip_bytes(
            {
                "cat/chelsea.png": sample_image("chelsea.png"),
                "x/moon.png": sample_image("moon.png"),
                "readme.md": b"# hi",
            }
        )
    )
    out = CliRunner().invoke(cli, ["ingest", str(pack), "--json"])
    assert out.exit_code == 0, out.output
    # a first ingest: the step's estimate first (two images, one Batch task), on stderr
    assert out.stderr.startswith("  raw_packs: estimate ingest: 2 prefixes, 2 images, 1 task, ")
    assert json.loads(out.stdout) == {
        "pack_id": "extra",
        "accepted": 1,
        "duplicates": 1,
        "rejected": [{"member": "readme.md", "reason": "not an image: extension .md"}],
        "labels": {"cat": 1, "x": 1},
        "boxes": {"accepted": 0, "rejected": 0},
        "label_conflicts": [],  # chelsea is a cat in the photos pack too
        "unchanged": False,
        "queryable": False,  # its one new image waits for sync
    }
    out = CliRunner().invoke(
        cli, ["ingest", str(pack)]
    )  # again, as text: the same pack, nothing new
    # a pack ingested before: no estimate (its hash decides whether it costs anything)
    assert (
        out.stderr == "  raw_packs: pack extra: rejected 'readme.md': not an image: extension .md\n"
    )
    assert (
        out.exit_code == 0
        and out.stdout
        == "pack extra: unchanged (these bytes were ingested before): 1 accepted, 1 duplicates, 1 rejected\n"
        "  labels: cat 1, x 1; boxes: 0 accepted, 0 rejected\n"
        "  rejected 'readme.md': not an image: extension .md\n"
        "  not queryable yet: `cvgraph sync` (or ingest --wait) indexes it; under `make ui` the daemon's automation does\n"
    ), out.output
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely truncated")
    out = CliRunner().invoke(cli, ["ingest", str(bad), "--json"])
    assert out.exit_code != 0 and "not a readable zip" in out.output
    out = CliRunner().invoke(
        cli,
        [
            "query",
            "SELECT label, count(*) AS n FROM images WHERE pack_id = 'digits' AND label IN ('3', '8') GROUP BY label ORDER BY label",
            "--json",
        ],
    )
    assert out.exit_code == 0 and json.loads(out.stdout) == [
        {"label": "3", "n": 183},
        {"label": "8", "n": 174},
    ]
    out = CliRunner().invoke(cli, ["query", "DELETE FROM images"])
    assert out.exit_code != 0 and "only read-only SELECT" in out.output
    # --wait: the pack is synced before the command returns, and its rows are there
    out = CliRunner().invoke(cli, ["ingest", str(pack), "--wait", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["queryable"] is True
    # the sync's progress, as each stage finishes its prefixes, on stderr (stdout is the JSON):
    # all from the index step's chain tasks (index, images and tables in one task start); the
    # image and table steps after it found their prefixes done
    done = re.findall(r"^  (\w+): \[(\d+)/(\d+)\] (\w+) [0-9a-f]{2}:", out.stderr, re.M)
    assert {(step, stage) for step, _, _, stage in done} == {
        ("raw_images", "index"),
        ("raw_images", "resize"),
        ("raw_images", "edges"),
        ("raw_images", "tables"),
    }, out.stderr
    assert "done by this run's chain tasks" in out.stderr
    assert all(n == total for _, n, total, _ in done)  # the one prefix with the new image
    assert ds.sql_query("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 2112}]
    out = CliRunner().invoke(cli, ["sync", "--json"])  # nothing left: the lake owes nothing
    assert out.exit_code == 0 and json.loads(out.stdout) == {
        "packs": [],
        "runs": [],
        "owed": {"packs": [], "prefixes": {}},
    }, out.output


def test_freeze_keys_and_columns_cannot_point_outside_the_lake(demo):
    from cvgraph.sdk import FreezeRefused

    ds, _, _ = demo
    for bad in ("../packs/digits", "", ".", "a b", "x/y"):
        with pytest.raises(FreezeRefused, match="not allowed"):
            ds.freeze_dataset(bad, "SELECT * FROM images")
    # key columns come from `images`, whatever the query says; a trailing comment is fine
    rec = ds.freeze_dataset(
        "sneaky_v1",
        "SELECT sha256, '/etc/passwd' AS resized_key, label FROM images WHERE label = '4' -- fours",
    )
    manifest = parquet_table(ds.lake.get("subsets/sneaky_v1/manifest.parquet"))
    assert rec["rows"] == 181 == manifest.num_rows
    assert all(k.startswith("resized/") for k in manifest["resized_key"].to_pylist())


def _cli(*args) -> tuple[int, str]:
    out = CliRunner().invoke(cli, list(args))
    return out.exit_code, out.output


def test_user_mistakes_are_one_line_and_leave_nothing_behind(demo, tmp_path):
    """Each mistake: the exact line, exit 1, and no partition, object or upload left by it."""
    from cvgraph.torch import FrozenSubsetDataset

    ds, _, _ = demo
    lake, inst = ds.lake, ds.instance
    subsets = lambda: set(inst.get_dynamic_partitions("subsets"))
    models = lambda: set(inst.get_dynamic_partitions("models"))
    before = (subsets(), models(), set(lake.keys("subsets/")), set(lake.keys("models/")))
    key_rule = "is not allowed: use 1-100 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"

    assert _cli("--version") == (0, "cvgraph, version 0.1.0\n")
    assert _cli("freeze", "bad key", "SELECT * FROM images") == (
        1,
        f"Error: subset key 'bad key' {key_rule}\n",
    )
    assert _cli("freeze", "unicorns_v1", "SELECT * FROM images WHERE label = 'unicorn'") == (
        1,
        "Error: freeze of 'unicorns_v1' failed: frozen_subsets: subset unicorns_v1: the query "
        "matched no images; nothing was frozen\n",
    )
    assert _cli("train", "my model", "--subset", DIGITS_SUBSET) == (
        1,
        f"Error: model key 'my model' {key_rule}\n",
    )
    # --debug: the exception itself (a traceback at a terminal), after its message
    out = CliRunner().invoke(cli, ["--debug", "train", "my model", "--subset", DIGITS_SUBSET])
    assert out.exit_code == 1 and type(out.exception).__name__ == "InvalidRequest"
    assert out.output == f"model key 'my model' {key_rule}\n"
    assert _cli("train", "ghost_cnn") == (
        1,
        "Error: model 'ghost_cnn' is new: give the frozen subset to train it on (--subset)\n",
    )
    code, text = _cli("train", "ghost_cnn", "--subset", "no_such_subset")
    assert code == 1 and text.startswith(
        "Error: no frozen subset 'no_such_subset' (frozen subsets: "
    )
    assert DIGITS_SUBSET in text and len(text.splitlines()) == 1
    assert _cli("train", DIGITS_MODEL, "--epochs", "-1") == (
        1,
        "Error: epochs must be 0 or more, not -1\n",
    )
    assert _cli("train", DIGITS_MODEL, "--arch", "vgg")[0] == 2  # click names the choices
    assert _cli("train", DIGITS_MODEL, "--lr", "0") == (1, "Error: lr must be in (0, 1], not 0.0\n")
    assert _cli("train", DIGITS_MODEL, "--input-size", "8") == (
        1,
        "Error: input_size must be 16 or more, not 8\n",
    )
    code, text = _cli("export", "no_such_model")
    assert code == 1 and text.startswith(
        "Error: no trained model 'no_such_model' (trained models: "
    )
    assert DIGITS_MODEL in text and len(text.splitlines()) == 1
    assert (subsets(), models(), set(lake.keys("subsets/")), set(lake.keys("models/"))) == before

    # flags not given are the model's last: training it again is the same training, nothing to do
    trained = json.loads(lake.get(f"models/{DIGITS_MODEL}/model.json"))
    assert trained["spec"]["arch"] == "small_cnn" and trained["spec"]["variant"] == "resized"
    assert ds.train(DIGITS_MODEL) == trained  # same record: same MLflow run, same job
    assert ds.train(DIGITS_MODEL, epochs=trained["spec"]["epochs"]) == trained

    # a subset with one class is frozen, but no model can be trained on it
    assert (
        _cli("freeze", "zeros_v1", "SELECT * FROM images WHERE pack_id = 'digits' AND label = '0'")[
            0
        ]
        == 0
    )
    assert _cli("train", "zeros_cnn", "--subset", "zeros_v1") == (
        1,
        "Error: subset 'zeros_v1' has 1 labelled class(es) (0): a classifier needs two or more\n",
    )
    assert "zeros_cnn" not in models() and not lake.keys("models/zeros_cnn/")

    # a re-freeze that differs only in case and spacing is the same subset; another query is not
    frozen = ds.subset(DIGITS_SUBSET)
    again = ds.freeze_dataset(
        DIGITS_SUBSET,
        "select *  from IMAGES\n where PACK_ID = 'digits' and label is not null",
    )
    assert again["manifest_sha256"] == frozen["manifest_sha256"]
    code, text = _cli("freeze", DIGITS_SUBSET, "SELECT * FROM images WHERE pack_id = 'Digits'")
    assert code == 1 and len(text.splitlines()) == 1
    assert f"subset {DIGITS_SUBSET} is frozen with a different query" in text

    with pytest.raises(ValueError, match="split 'training': expected one of train, val, test"):
        FrozenSubsetDataset(DIGITS_SUBSET, split="training")

    # a pack that is not a zip: the line, exit 2, and neither its upload nor a pack kept
    junk = tmp_path / "chelsea.zip"
    junk.write_bytes(sample_image("chelsea.png"))
    code, text = _cli("ingest", str(junk))
    assert code == 2 and len(text.splitlines()) == 1 and "not a readable zip" in text
    assert not lake.exists("incoming/chelsea.zip") and not lake.keys("packs/chelsea/")
    assert "chelsea" not in inst.get_dynamic_partitions("packs")
    # the same bytes ingested again: said so
    code, text = _cli("ingest", str(ds.lake.path("incoming/digits.zip")), "--name", "digits")
    assert (code, text) == (
        0,
        "pack digits: unchanged (these bytes were ingested before): 1797 accepted, 0 duplicates, 0 rejected\n"
        "  labels: 0 178, 1 182, 2 177, 3 183, 4 181, 5 182, 6 181, 7 179, 8 174, 9 180; "
        "boxes: 0 accepted, 0 rejected\n"
        "  its images are queryable\n",
    )


def test_predict_runs_an_export_on_image_files_as_training_saw_them(demo, tmp_path):
    """preprocess.json says how an image becomes the input; predict applies it to original
    files and gets what the model gives the lake's own resized images (same kernel, same bytes)."""
    from cvgraph.errors import InvalidRequest

    ds, _, _ = demo
    pre = json.loads(ds.lake.get(f"exports/{DIGITS_MODEL}/preprocess.json"))
    model = json.loads(ds.lake.get(f"models/{DIGITS_MODEL}/model.json"))
    size, stated = model["spec"]["input_size"], model["preprocess"]
    assert pre["input"] == {
        "name": "image",
        "shape": ["batch", 3, size, size],
        "dtype": "float32",
        "channels": 3,
        "mean": stated["mean"],
        "std": stated["std"],
    }
    assert len(stated["mean"]) == 3 and all(0 < s < 1 for s in stated["std"])
    assert pre["output"]["classes"] == model["classes"] and pre["variant"] == "resized"
    assert pre["resize"] == {"size": 64, "jpeg_quality": 90}
    manifest = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
    rows = [r for r in manifest.to_pylist() if r["split"] == "test"][:12]
    paths = []
    for i, r in enumerate(rows):
        paths.append(tmp_path / f"{i}.{r['original_key'].rsplit('.', 1)[1]}")
        paths[-1].write_bytes(ds.lake.get(r["original_key"]))
    got = ds.predict(DIGITS_MODEL, paths)

    # the same model on the lake's resized images, as the trainer loads them
    session = ort.InferenceSession(
        str(ds.lake.path(f"exports/{DIGITS_MODEL}/onnx/model.onnx")),
        providers=["CPUExecutionProvider"],
    )
    x = np.stack([_as_input(ds.lake.get(r["resized_key"]), pre) for r in rows])
    expected = session.run(None, {"image": x})[0]
    assert [g["class"] for g in got] == [model["classes"][int(i)] for i in expected.argmax(1)]
    assert np.allclose([g["logits"] for g in got], expected, atol=1e-3)
    assert [g["image"] for g in got] == [str(p) for p in paths]

    out = CliRunner().invoke(cli, ["predict", DIGITS_MODEL, str(paths[0]), "--format", "onnx_int8"])
    assert out.exit_code == 0 and out.output.startswith(f"{paths[0]}: ")
    # a directory: its image files, by name (nothing else in it is read)
    (tmp_path / "notes.md").write_text("not an image, not read")
    assert ds.predict(DIGITS_MODEL, [tmp_path]) == sorted(got, key=lambda g: g["image"])
    with pytest.raises(InvalidRequest, match=f"^no image files in {tmp_path / 'empty'}$"):
        (tmp_path / "empty").mkdir()
        ds.predict(DIGITS_MODEL, [tmp_path / "empty"])
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    out = CliRunner().invoke(cli, ["predict", DIGITS_MODEL, str(junk)])
    assert out.exit_code == 1 and out.output.startswith(
        f"Error: not an image the model can read: {junk}: undecodable image"
    )
    assert len(out.output.splitlines()) == 1


def test_forget_removes_a_key_and_refuses_while_something_uses_it(demo):
    ds, _, _ = demo
    lake, inst = ds.lake, ds.instance
    ds.freeze_dataset("forget_me_v1", "SELECT * FROM images WHERE label = '9'")
    made = lake.keys("subsets/forget_me_v1/")
    assert "subsets/forget_me_v1/subset.json" in made
    assert _cli("forget", "subset", "forget_me_v1") == (
        0,
        f"forgot subset forget_me_v1 ({len(made)} objects)\n",
    )
    assert lake.keys("subsets/forget_me_v1/") == []
    assert "forget_me_v1" not in inst.get_dynamic_partitions("subsets")
    ds.freeze_dataset("forget_me_v2", "SELECT * FROM images WHERE label = '9'")
    code, text = _cli("forget", "subset", "forget_me_v2", "--json")
    assert code == 0 and json.loads(text) == {
        "kind": "subset",
        "key": "forget_me_v2",
        "objects": len(made),
    }
    code, text = _cli("forget", "subset", "forget_me_v1")
    assert code == 1 and text.startswith("Error: no frozen subset 'forget_me_v1' (frozen subsets: ")

    assert _cli("forget", "subset", DIGITS_SUBSET) == (
        1,
        f"Error: subset '{DIGITS_SUBSET}' is used by model(s) {DIGITS_MODEL}: forget that first\n",
    )
    assert _cli("forget", "model", DIGITS_MODEL) == (
        1,
        f"Error: model '{DIGITS_MODEL}' is used by exports of {DIGITS_MODEL}: forget that first\n",
    )
    assert lake.exists(f"models/{DIGITS_MODEL}/model.json")
    assert lake.exists(f"subsets/{DIGITS_SUBSET}/subset.json")


def test_training_reports_each_epoch_while_it_runs(demo):
    """The training entry's epoch lines reach ``progress`` (the CLI's stderr) while the run goes:
    each arrives before the model's record exists."""
    import mlflow

    from cvgraph.sdk import Datasets
    from orchestration.settings import home, mlflow_tracking_uri

    ds, _, _ = demo
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    heard, curves = [], []

    def hear(line: str) -> None:
        heard.append((line, ds.lake.exists(record)))
        if " epoch=" in line:  # the MLflow runs still going, and the val losses they hold now
            running = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                "attributes.status = 'RUNNING'",
            )
            curves.append(
                {
                    r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_loss"))
                    for r in running
                }
            )

    live = Datasets(progress=hear)
    record = "models/progress_cnn/model.json"
    rec = live.train("progress_cnn", DIGITS_SUBSET, epochs=2, width=8, arch="small_cnn")
    epochs = [(line, made) for line, made in heard if "epoch=" in line]
    assert [line.split(" ")[1] for line, _ in epochs] == ["epoch=1", "epoch=2"]
    # live curves: at the second epoch's line the training's MLflow run, still going, holds the
    # first epoch's val loss; when it is done it holds each epoch's once
    assert curves[1].get(rec["mlflow_run_id"], 0) >= 1, curves
    history = client.get_metric_history(rec["mlflow_run_id"], "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert all(line.startswith("trained_models: epoch=") and not made for line, made in epochs)
    assert heard[-1] == (
        f"trained_models: model progress_cnn: test accuracy {rec['test_accuracy']:.4f} on "
        f"{rec['counts']['test']} held-out images",
        True,  # said once the record is written
    )
    # the CLI prints them on stderr; trained already, the run says so and stdout is the result
    out = CliRunner().invoke(cli, ["train", "progress_cnn"])
    assert out.exit_code == 0 and out.stderr == (
        "  trained_models: model progress_cnn already trained on this subset and spec; nothing to do\n"
    )
    assert out.stdout.startswith("model progress_cnn: test accuracy ")
    assert _cli("forget", "model", "progress_cnn")[0] == 0
    # no training job keeps its scratch (the model and metrics are in the lake)
    assert list((home() / "training").iterdir()) == []


def _pixel_changed(name: str, value: int) -> bytes:
    """A bundled photo with one pixel changed: an image no demo pack holds."""
    im = cv2.imdecode(np.frombuffer(sample_image(name), np.uint8), cv2.IMREAD_COLOR)
    im[0, 0] = value
    return cv2.imencode(".png", im)[1].tobytes()


def test_forget_pack_takes_its_images_out_and_every_prefix_back_to_its_versions(demo, tmp_path):
    """A pack of two new images and one the demo's photos pack holds, ingested, then forgotten:
    its originals and variants are deleted, the shared image keeps its row (as the photos pack
    labels it), and every index, hash index, table row and Dagster data version is what it was
    before the pack came."""
    ds, _, _ = demo
    lake, inst = ds.lake, ds.instance
    kept_areas = ("raw/", "resized/", "edges/", "index/raw/", "index/resized/", "index/edges/")

    def lake_state() -> dict:
        return {k: sha256_hex(lake.get(k)) for a in kept_areas for k in lake.keys(a)}

    def versions() -> dict:
        """Each prefix's own data version (a ranged run's version is the range's merkle root)."""
        import dagster as dg

        out = {}
        for asset in PREFIX_ASSETS:
            records, cursor, more = [], None, True
            while more:
                page = inst.fetch_materializations(dg.AssetKey(asset), limit=10000, cursor=cursor)
                records, cursor, more = records + list(page.records), page.cursor, page.has_more
            for r in sorted(records, key=lambda r: r.storage_id):
                mat = r.event_log_entry.asset_materialization
                out[asset, mat.partition] = mat.metadata["prefix_data_version"].value
        return out

    rows_sql = "SELECT sha256, label, packs FROM images ORDER BY sha256"
    before = (lake_state(), versions(), ds.sql_query(rows_sql).to_pylist())
    pack = tmp_path / "passing.zip"
    shared = sample_image("chelsea.png")  # in the demo's photos pack
    pack.write_bytes(
        zip_bytes(
            {
                "cat/a.png": _pixel_changed("chelsea.png", 7),
                "mug/b.png": _pixel_changed("coffee.png", 9),
                "cat/c.png": shared,
            }
        )
    )
    assert _cli("ingest", str(pack), "--wait")[0] == 0
    new = [
        sha256_hex(b) for b in (_pixel_changed("chelsea.png", 7), _pixel_changed("coffee.png", 9))
    ]
    held = ds.sql_query("SELECT sha256, packs FROM images WHERE list_contains(packs, 'passing')")
    assert sorted(r["sha256"] for r in held.to_pylist()) == sorted([*new, sha256_hex(shared)])
    assert lake.exists("incoming/passing.zip") and "passing" in inst.get_dynamic_partitions("packs")

    # a pack a frozen subset holds images of is refused; an unknown one names those there are
    code, text = _cli("forget", "pack", "digits")
    assert code == 1 and text.startswith(
        f"Error: pack 'digits' is used by subset(s) {DIGITS_SUBSET}"
    )
    assert text.endswith(": forget that first\n") and len(text.splitlines()) == 1
    code, text = _cli("forget", "pack", "no_such_pack")
    assert code == 1 and text.startswith("Error: no ingested pack 'no_such_pack' (ingested packs: ")

    own = len(lake.keys("packs/passing/")) + 1  # and its upload
    out = CliRunner().invoke(cli, ["forget", "pack", "passing"])
    assert (out.exit_code, out.stdout) == (0, f"forgot pack passing ({own} objects)\n"), out.output
    # one ranged run from the first to the last owed prefix; only the pack's three prefixes worked
    assert "raw_images: [3/3] index " in out.stderr
    assert "raw_images: 3 of " in out.stderr and "image_tables: 3 of " in out.stderr
    assert (lake_state(), versions(), ds.sql_query(rows_sql).to_pylist()) == before
    assert not lake.keys("packs/passing/") and not lake.exists("incoming/passing.zip")
    assert "passing" not in inst.get_dynamic_partitions("packs")
    assert not lake.keys("_pending/raw_images/")
    # forgotten, it can come back: the same zip is a new pack again
    code, text = _cli("ingest", str(pack))
    assert code == 0 and text.startswith("pack passing: 2 accepted, 1 duplicates, 0 rejected\n")
    assert ds.forget("pack", "passing") == own
    assert (lake_state(), versions()) == before[:2]


def test_detection_targets_follow_the_variant_geometry(demo):
    """The photos pack's COCO boxes, frozen, come back as xyxy in each variant's pixels: as
    annotated for ``original``, through the short-side resize and centre crop for ``resized``
    (computed here from the annotation and the image's size), clipped or left out by the crop."""
    from torch.utils.data import DataLoader

    from cvgraph.demo_packs import PHOTOS
    from cvgraph.torch import FrozenSubsetDataset, collate_detection

    ds, _, _ = demo
    rec = ds.freeze_dataset("photo_boxes_v1", "SELECT * FROM images WHERE pack_id = 'photos'")
    by_sha = {sha256_hex(sample_image(name)): (cat, b) for name, _, cat, b in PHOTOS}
    manifest = parquet_table(ds.lake.get("subsets/photo_boxes_v1/manifest.parquet")).to_pylist()
    expected = {}
    for r in manifest:
        cat, b = by_sha[r["sha256"]]
        expected.setdefault(cat, 0)
        expected[cat] += 1
    assert rec["boxes"] == dict(sorted(expected.items()))
    assert rec["images_without_boxes"] == 0

    original = FrozenSubsetDataset(
        "photo_boxes_v1", variant="original", split=None, target="detection"
    )
    resized = FrozenSubsetDataset(
        "photo_boxes_v1", variant="resized", split=None, target="detection"
    )
    assert original.classes == resized.classes == sorted(expected)
    size = 64  # the resize settings' side
    for i, r in enumerate(original.rows):
        cat, (x, y, w, h) = by_sha[r["sha256"]]
        img, target = original[i]
        assert target["labels"].tolist() == [original.classes.index(cat)]
        assert target["boxes"].tolist() == [[x, y, x + w, y + h]]
        W, H = r["width"], r["height"]
        assert tuple(img.shape) == (3, H, W)
        # independently: scale the short side to 64, centre-crop the long one
        s = size / min(W, H)
        nw, nh = max(size, round(W * s)), max(size, round(H * s))
        ox, oy = (nw - size) // 2, (nh - size) // 2
        x0, x1 = [min(max(v * nw / W - ox, 0), size) for v in (x, x + w)]
        y0, y1 = [min(max(v * nh / H - oy, 0), size) for v in (y, y + h)]
        img, target = resized[i]
        assert tuple(img.shape) == (3, size, size)
        if x1 > x0 and y1 > y0:
            assert target["boxes"].numpy() == pytest.approx(np.array([[x0, y0, x1, y1]]), abs=1e-4)
            assert target["labels"].tolist() == [resized.classes.index(cat)]
        else:  # the crop left nothing of it
            assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images, targets = next(iter(DataLoader(resized, batch_size=4, collate_fn=collate_detection)))
    assert len(images) == len(targets) == 4 and all(
        t["boxes"].dtype == torch.float32 for t in targets
    )
    with pytest.raises(ValueError, match="target 'boxes': expected one of class, detection"):
        FrozenSubsetDataset("photo_boxes_v1", target="boxes")
    assert _cli("forget", "subset", "photo_boxes_v1")[0] == 0


def test_each_training_of_a_key_is_a_registered_version_and_older_exports_are_flagged(demo):
    import mlflow

    from orchestration.settings import mlflow_tracking_uri

    ds, _, _ = demo
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    ds.freeze_dataset(
        "zero_one_v1", "SELECT * FROM images WHERE pack_id = 'digits' AND label IN ('0', '1')"
    )
    first = ds.train("retrain_cnn", DIGITS_SUBSET, epochs=1, width=4, arch="small_cnn")
    ds.export("retrain_cnn")
    scored = ds.evaluate("retrain_cnn", DIGITS_SUBSET)
    assert not ds.lineage("retrain_cnn")["evaluations"][0]["stale"]
    second = ds.train("retrain_cnn", "zero_one_v1", epochs=1, width=4, arch="small_cnn")
    assert (first["mlflow_model_version"], second["mlflow_model_version"]) == ("1", "2")
    versions = {str(v.version): v for v in client.search_model_versions("name = 'retrain_cnn'")}
    assert {k: v.tags["cvgraph.subset"] for k, v in versions.items()} == {
        "1": DIGITS_SUBSET,
        "2": "zero_one_v1",
    }
    assert (
        versions["1"].tags["cvgraph.exports_run"]
        and "cvgraph.exports_run" not in versions["2"].tags
    )
    # the exports are version 1's: lineage says so, and what makes them again
    text = _cli("lineage", "retrain_cnn")[1]
    assert f"export retrain_cnn  (model v1 {first['model_sha256'][:12]})" in text
    assert "STALE: made from an older training of retrain_cnn than the model below" in text
    assert f"└─ model retrain_cnn v2  sha256 {second['model_sha256'][:12]}" in text
    # so is the evaluation, and the reverse lineage of its pack names it
    assert (
        f"evaluation retrain_cnn v1 on {DIGITS_SUBSET}  accuracy {scored['scores']['accuracy']:.4f}"
        f"  STALE: of an older training; `cvgraph evaluate retrain_cnn {DIGITS_SUBSET}` scores this one"
    ) in text
    assert f"retrain_cnn on {DIGITS_SUBSET}" in ds.made_from(pack="digits")["evaluations"]
    assert "zero_one_v1" in ds.made_from(pack="digits")["subsets"]
    assert json.loads(CliRunner().invoke(cli, ["lineage", "retrain_cnn", "--json"]).stdout)[
        "export"
    ]["stale"]
    ds.export("retrain_cnn")
    assert not ds.lineage("retrain_cnn")["export"]["stale"]
    assert ds.record("export", "retrain_cnn")["model_version"] == "2"
    for kind, key in (
        ("export", "retrain_cnn"),
        ("model", "retrain_cnn"),
        ("subset", "zero_one_v1"),
    ):
        assert _cli("forget", kind, key)[0] == 0
    # the model's evaluations went with it
    assert ds.lake.keys("evaluations/retrain_cnn/") == []
    assert f"retrain_cnn on {DIGITS_SUBSET}" not in ds.made_from(pack="digits")["evaluations"]


def test_ls_and_what_was_made_from_a_pack_or_an_image(demo):
    ds, _, _ = demo
    code, text = _cli("ls", "models")
    assert code == 0 and f"{DIGITS_MODEL} v1  test accuracy " in text
    assert f"subset {DIGITS_SUBSET}  exports current" in text
    rows = json.loads(CliRunner().invoke(cli, ["ls", "subsets", "--json"]).stdout)
    digits = next(r for r in rows if r["key"] == DIGITS_SUBSET)
    assert digits == {
        "key": DIGITS_SUBSET,
        "rows": 1797,
        "balance": ds.subset(DIGITS_SUBSET)["balance"]["score"],
        "packs": ["digits"],
    }
    packs = {r["pack_id"]: r for r in ds.ls("packs")}
    assert packs["digits"]["accepted"] == 1797 and packs["digits"]["labels"] == 10
    assert packs["photos"]["boxes"] == 14  # one COCO box per photo
    # reverse lineage: from a pack, and from one image of it
    made = json.loads(CliRunner().invoke(cli, ["lineage", "--pack", "digits", "--json"]).stdout)
    assert made["pack"] == "digits" and DIGITS_SUBSET in made["subsets"]
    assert DIGITS_MODEL in made["models"] and DIGITS_MODEL in made["exports"]
    sha = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))["sha256"][
        0
    ].as_py()
    assert ds.made_from(image=sha)["subsets"] == [
        s
        for s in made["subsets"]
        if sha in parquet_table(ds.lake.get(f"subsets/{s}/manifest.parquet"))["sha256"].to_pylist()
    ]
    assert _cli("lineage", "--image", "0" * 64) == (
        1,
        f"Error: no image {'0' * 64} in the index (prefix 00)\n",
    )
    assert _cli("lineage", "--pack", "nope")[1].startswith("Error: no ingested pack 'nope'")
    assert _cli("lineage") == (1, "Error: give a model or subset KEY, or one of --pack / --image\n")


def test_evaluation_scores_unseen_rows_and_moves_the_champion_by_its_rule(demo):
    """The demo evaluated its model on its test split: the scores recomputed here from the
    confusion matrix, the pictures in the lake and the UI, the metrics on MLflow, and the
    champion alias set (no champion before); a second version that does no better keeps it."""
    import mlflow

    from orchestration.settings import mlflow_tracking_uri

    ds, _, _ = demo
    rec = ds.evaluate(DIGITS_MODEL, DIGITS_SUBSET)  # the demo's, reused
    s = rec["scores"]
    manifest = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
    assert s["scored"] == sum(1 for r in manifest.to_pylist() if r["split"] == "test")
    m = np.array(s["confusion"])
    assert m.sum() == s["scored"] and s["accuracy"] == pytest.approx(np.trace(m) / m.sum())
    for i, c in enumerate(s["classes"]):
        p, r = m[i, i] / m[:, i].sum(), m[i, i] / m[i].sum()
        assert s["per_class"][c]["f1"] == pytest.approx(2 * p * r / (p + r))
    assert rec["champion"] == {
        "before": None,
        "after": "1",
        "moved": True,
        "reason": "no champion yet: v1 is now the champion",
    }
    meta = latest_metadata(ds.instance, "model_evaluations", f"{DIGITS_MODEL}|{DIGITS_SUBSET}")
    assert shown_png(meta["confusion_matrix"]) == ds.lake.get(rec["confusion"])
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    run = client.get_run(rec["mlflow_run_id"])
    assert run.data.metrics["accuracy"] == pytest.approx(s["accuracy"])
    assert run.data.tags["cvgraph.model_version"] == "1"
    assert str(client.get_model_version_by_alias(DIGITS_MODEL, "champion").version) == "1"
    # version 2, one epoch of a narrower net: not better on the same rows, so no promotion
    ds.train(DIGITS_MODEL, DIGITS_SUBSET, epochs=1, width=4, arch="small_cnn")
    second = ds.evaluate(DIGITS_MODEL, DIGITS_SUBSET)
    assert second["model_version"] == "2" and second["scores"]["accuracy"] <= s["accuracy"]
    assert second["champion"]["moved"] is False and second["champion"]["after"] == "1"
    assert second["champion"]["reason"].endswith(
        f"does not beat champion v1's {s['accuracy']:.4f} on {DIGITS_SUBSET}"
    )
    code, text = _cli("evaluate", DIGITS_MODEL, DIGITS_SUBSET)
    assert code == 0 and text.startswith(f"{DIGITS_MODEL} v2 on {DIGITS_SUBSET}: accuracy ")


def test_the_demo_on_a_postgres_instance_gives_the_sqlite_instances_versions(
    demo, postgres_database, tmp_path, monkeypatch
):
    """The same demo, its Dagster instance on a real PostgreSQL server (CVGRAPH_DAGSTER_PG_URL):
    every prefix partition and the subset get the data versions the SQLite instance gave them,
    and nothing of the instance is on disk."""
    import os
    import subprocess
    import sys

    import dagster as dg

    _, first, _ = demo
    url = postgres_database("demo")
    home = tmp_path / "home"
    # a user's own home: its lake, MLflow store and instance (dagster-mlflow exports the
    # tracking URI of this process's runs, so that goes too)
    mine = ("DAGSTER_HOME", "CVGRAPH_LAKE_URL", "MLFLOW_TRACKING_URI", "CVGRAPH_MLFLOW_ARTIFACTS")
    env = {k: v for k, v in os.environ.items() if k not in mine}
    env.update(CVGRAPH_HOME=str(home), CVGRAPH_DAGSTER_PG_URL=url, CVGRAPH_PROFILE="local")
    out = subprocess.run(
        [sys.executable, "-m", "cvgraph.cli", "demo", "--epochs", "4", "--arch", "small_cnn"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered model:     digits_cnn version 1 " in out.stdout
    monkeypatch.setenv("CVGRAPH_DAGSTER_PG_URL", url)  # dagster.yaml names the variable
    with dg.DagsterInstance.from_config(str(home / "dagster")) as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        state = dagster_state(inst)
    for asset in (*PREFIX_ASSETS, "frozen_subsets"):
        assert state[asset]["versions"] == first["dagster"][asset]["versions"], asset
    assert len(state["raw_images"]["versions"]) == 256
    assert not (home / "dagster" / "history").exists()


def test_a_training_starts_from_a_registered_versions_weights(demo):
    """``init_from``: a model's registered version, checked by its sha256, starts a
    training on the same classes (one epoch reaches what training from scratch does not) and on
    other classes (a new head); the version is resolved and recorded, on the model and on its
    registered version; what cannot start from it is one line."""
    import mlflow

    from orchestration.settings import mlflow_tracking_uri

    ds, _, _ = demo
    base_key = "base_cnn"
    quick = {"epochs": 1, "arch": "small_cnn", "min_steps": 0}
    # a model of its own to start from (others' tests train the demo's model again)
    base = ds.train(base_key, DIGITS_SUBSET, arch="small_cnn", epochs=6)
    version = base["mlflow_model_version"]
    scratch = ds.train("scratch_cnn", DIGITS_SUBSET, **quick)
    tuned = ds.train("tuned_cnn", DIGITS_SUBSET, init_from=base_key, **quick)
    assert tuned["spec"]["init_from"] == f"{base_key}@{version}"
    assert tuned["init_from"] == {
        "model": base_key,
        "version": version,
        "model_sha256": base["model_sha256"],
    }
    assert tuned["test_accuracy"] >= 0.9 and tuned["test_accuracy"] > scratch["test_accuracy"]
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    tags = client.get_model_version("tuned_cnn", tuned["mlflow_model_version"]).tags
    assert tags["cvgraph.init_from"] == f"{base_key}@{version}"
    assert tags["cvgraph.model_sha256"] == tuned["model_sha256"]
    # the same again is nothing to do (the latest version resolved to the same one)
    assert ds.train("tuned_cnn", init_from=base_key) == tuned

    # other classes: the body kept, a new head
    ds.freeze_dataset(
        "three_classes_v1",
        "SELECT * FROM images WHERE pack_id = 'digits' AND label IN ('0', '3', '8')",
    )
    other = ds.train(  # a new head: a few epochs of a hundred images
        "other_cnn", "three_classes_v1", init_from=f"{base_key}@{version}", **{**quick, "epochs": 4}
    )
    assert other["classes"] == ["0", "3", "8"] and other["test_accuracy"] >= 0.9

    assert _cli("train", "x_cnn", "--subset", DIGITS_SUBSET, "--init-from", "no_such_model") == (
        1,
        "Error: trained_models: model x_cnn: init_from: no registered model 'no_such_model'\n",
    )
    code, text = _cli("train", "x_cnn", "--subset", DIGITS_SUBSET, "--init-from", f"{base_key}@99")
    assert code == 1 and text.startswith(
        f"Error: trained_models: model x_cnn: init_from: model '{base_key}' has no version 99"
    )
    assert _cli(
        "train",
        "x_cnn",
        "--subset",
        DIGITS_SUBSET,
        "--init-from",
        base_key,
        "--arch",
        "resnet18",
    ) == (
        1,
        f"Error: trained_models: model x_cnn: init_from {base_key}@{version} is a small_cnn model: train it with --arch small_cnn\n",
    )
    assert _cli(
        "train",
        "x_cnn",
        "--subset",
        DIGITS_SUBSET,
        "--init-from",
        base_key,
        "--arch",
        "small_cnn",
        "--input-size",
        "96",
    ) == (
        1,
        f"Error: trained_models: model x_cnn: init_from {base_key}@{version} was trained at "
        "32 px: train it with --input-size 32\n",
    )
    assert _cli("train", "x_cnn", "--subset", DIGITS_SUBSET, "--init-from", "a@b@c") == (
        1,
        "Error: init_from 'a@b@c': expected MODEL or MODEL@VERSION (e.g. digits_cnn@2)\n",
    )
    assert not ds.lake.keys("models/x_cnn/")


@pytest.mark.parametrize("source", ["shards", "objects"])
def test_streaming_subset_reads_the_lake_as_the_trainer_does(demo, source):
    """``cvgraph.torch.streaming_subset``: every image of the split once per epoch, normalised
    (about zero mean), the same images for any number of workers (from objects: the same
    batches); from shards, the shards the trainer reads (written by the call if missing)."""
    from cvgraph.torch import streaming_subset
    from workloads.training.data import loader

    ds, _, _ = demo
    data = streaming_subset(DIGITS_SUBSET, split="val", size=32, source=source)
    manifest = parquet_table(ds.lake.get(f"subsets/{DIGITS_SUBSET}/manifest.parquet"))
    val = [r for r in manifest.to_pylist() if r["split"] == "val"]
    batches = list(loader(data, 64, 0))
    assert sum(len(y) for _, y in batches) == len(val)
    x = torch.cat([b for b, _ in batches])
    assert x.shape[1:] == (3, 32, 32) and abs(float(x.mean())) < 0.5
    labels = sorted(data.classes[int(i)] for _, y in batches for i in y)
    assert labels == sorted(r["label"] for r in val)
    again = list(loader(data, 64, 2))
    if source == "objects":
        assert len(data) == len(val)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    else:
        images = sorted(t.numpy().tobytes() for t in x)
        assert sorted(t.numpy().tobytes() for b, _ in again for t in b) == images
        index = json.loads(ds.lake.get(f"subsets/{DIGITS_SUBSET}/shards/resized/index.json"))
        assert index["splits"]["val"]["count"] == len(val)
