"""Labels for new packs (`pack_predictions`, `cvgraph predictions`): a pack without labels scored by
the labeller's export, its rows in the `predictions` table equal to onnxruntime run directly on
the same bytes, joined with `images` by SQL and by a freeze, re-scored when the champion changes
(the sensor), killed and run again to the same rows; each user mistake one line.

One user's home is built once, in this process (a labelled pack `a` and a pack `u` without
labels synced, `s` frozen from a's labels, `m` trained two epochs and exported), and copied for
each test; the commands under test run as a user runs them (`cvgraph ...` processes) where the
CLI is the subject, else through the SDK they call."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from tests.lake_state import cvgraph, killed_at
from tests.predictions_expected import ort_rows, zip_members

LABELS = "SELECT * FROM images WHERE label IS NOT NULL"
PREDICTIONS = dg.AssetKey("pack_predictions")


def use_home(mp: pytest.MonkeyPatch, home: Path, labeller: str | None = "m") -> None:
    """This process as the user of ``home`` (restored when ``mp`` undoes)."""
    mp.setenv("CVGRAPH_HOME", str(home))
    mp.setenv("DAGSTER_HOME", str(home / "dagster"))
    mp.setenv("CVGRAPH_PROFILE", "local")
    mp.delenv("CVGRAPH_LAKE_URL", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    if labeller:
        mp.setenv("CVGRAPH_LABELLER", labeller)
    else:
        mp.delenv("CVGRAPH_LABELLER", raising=False)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """`a`: 60 digits 0-2 in class folders. `u`: 30 other digits 0-2 at the zip's root, so the
    ingest gives them no label."""
    from cvgraph.demo_packs import digit_members, zip_bytes

    root = tmp_path_factory.mktemp("prediction_packs")
    labelled = digit_members(size=32, limit=60, classes=(0, 1, 2))
    more = digit_members(size=32, limit=90, classes=(0, 1, 2))
    unlabelled = {f"u_{k.split('_')[1]}": v for k, v in more.items() if k not in labelled}
    assert len(unlabelled) == 30
    out = {"a": root / "a.zip", "u": root / "u.zip"}
    out["a"].write_bytes(zip_bytes(labelled))
    out["u"].write_bytes(zip_bytes(unlabelled))
    return out


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory, packs) -> Path:
    """Packs synced, `s` frozen, `m` trained and exported; nothing scored yet."""
    from cvgraph import Datasets

    home = tmp_path_factory.mktemp("trained") / "home"
    with pytest.MonkeyPatch.context() as mp:
        use_home(mp, home, labeller=None)
        ds = Datasets()
        for p in packs.values():
            ds.upload(p)
        ds.sync()
        ds.freeze_dataset("s", LABELS)
        ds.train("m", subset="s", epochs=2, arch="small_cnn")
        ds.export("m")
    return home


def copy_home(trained_home: Path, to: Path) -> Path:
    """A second user with the same lake, instance and registry (none of them holds a path of
    its home: they follow CVGRAPH_HOME)."""
    shutil.copytree(trained_home, to, symlinks=True)
    return to


def labeller_env(user_env, home: Path, model: str = "m") -> dict:
    return {**user_env(home), "CVGRAPH_LABELLER": model}


def lake_of(home: Path):
    from workloads.lake import LocalLake

    return LocalLake(home / "lake")


def query(home: Path, sql: str) -> list[dict]:
    """``sql`` over the home's tables, as `cvgraph query` runs it (the local profile's catalog)."""
    from resources.catalog import DuckDBCatalog
    from resources.storage import LakeResource

    return DuckDBCatalog(lake=LakeResource(url=str(home / "lake"))).query(sql).to_pylist()


def scores(rows) -> dict[str, dict]:
    return {r["sha256"]: {"class": r["class"], "probability": r["probability"]} for r in rows}


def expected(home: Path, packs: dict[str, Path], pack: str = "u") -> dict[str, dict]:
    """The rows the pack's images must get from the lake's export: onnxruntime run directly on
    the zip's bytes."""
    lake = lake_of(home)
    return ort_rows(
        zip_members(packs[pack].read_bytes()),
        lake.get("exports/m/onnx/model.onnx"),
        lake.get("exports/m/preprocess.json"),
    )


def one_line_error(out) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def clean_scores(trained_home, tmp_path_factory, user_env) -> dict:
    """`cvgraph predictions u --json` in a copy of the home, never interrupted: its output and
    the lake's part and record."""
    home = copy_home(trained_home, tmp_path_factory.mktemp("clean") / "home")
    out = json.loads(cvgraph(labeller_env(user_env, home), "predictions", "u", "--json").stdout)
    lake = lake_of(home)
    return {
        "home": home,
        "out": out,
        "part": lake.get("tables/predictions/u.parquet"),
        "record": json.loads(lake.get("packs/u/predictions/predictions.json")),
    }


def test_a_users_mistakes_are_one_line_and_make_nothing(
    trained_home, tmp_path, user_env, monkeypatch
):
    """No labeller set, a labeller whose export was forgotten, an unknown pack: one line each
    from the CLI, exit 1. A labeller that is no model, a labeller key that is no key: the
    one-line errors (the SDK's) the CLI prints. Nothing scored."""
    from cvgraph import Datasets
    from cvgraph.errors import InvalidRequest, UnknownKey
    from orchestration.settings import SettingError

    line = one_line_error(cvgraph(user_env(trained_home), "predictions", "u", check=False))
    assert line == (
        "Error: no labeller: set CVGRAPH_LABELLER to the key of an exported classifier "
        "(README, Settings)"
    )
    home = copy_home(trained_home, tmp_path / "home")
    use_home(monkeypatch, home)
    Datasets().forget("export", "m")
    line = one_line_error(cvgraph(labeller_env(user_env, home), "predictions", "u", check=False))
    assert line == "Error: labeller 'm' has no export: `cvgraph export m` first"
    out = cvgraph(labeller_env(user_env, trained_home), "predictions", "nope", check=False)
    assert one_line_error(out) == "Error: no ingested pack 'nope' (ingested packs: a, u)"
    use_home(monkeypatch, trained_home)
    with pytest.raises(UnknownKey, match=r"^no ingested pack 'nope' \(ingested packs: a, u\)$"):
        Datasets().predictions("nope")
    use_home(monkeypatch, trained_home, labeller="zzz")
    with pytest.raises(
        InvalidRequest,
        match=r"^labeller 'zzz' \(CVGRAPH_LABELLER\) is no trained model \(exported models: m\)$",
    ):
        Datasets().predictions("u")
    use_home(monkeypatch, trained_home, labeller="../m")
    with pytest.raises(SettingError, match=r"^CVGRAPH_LABELLER: model key '\.\./m' is not allowed"):
        Datasets().predictions("u")
    for h in (trained_home, home):
        assert not lake_of(h).keys("tables/predictions/")
        assert not lake_of(h).keys("packs/u/predictions/")


def test_a_pack_without_labels_is_scored_by_the_export_and_joins_images(
    clean_scores, packs, monkeypatch
):
    """Rows equal onnxruntime run directly on the same bytes (class and probability, exactly);
    the data version is f(the pack's, the export's ONNX sha256), in the lake and in Dagster,
    with the pictures in its metadata; the labels are untouched; a freeze selects on the
    predictions (an `images.*` and a `*` join); asked again, nothing runs."""
    from cvgraph import Datasets
    from workloads.lake import read_parquet
    from workloads.predictions import pack_version, predictions_version

    home, out = clean_scores["home"], clean_scores["out"]
    lake = lake_of(home)
    want = expected(home, packs)
    assert scores(out["rows"]) == want
    assert sorted(r["member"] for r in out["rows"]) == sorted(zip_members(packs["u"].read_bytes()))
    assert all(r["label"] is None for r in out["rows"])
    assert (out["model"], out["version"], out["champion"], out["images"], out["failed"]) == (
        "m",
        1,
        False,
        30,
        0,
    )
    assert out["scored_by"] == "m v1 (no champion yet: its latest export)"
    onnx_sha = hashlib.sha256(lake.get("exports/m/onnx/model.onnx")).hexdigest()
    pack_record = json.loads(lake.get("packs/u/pack.json"))
    version = predictions_version(pack_version(pack_record), onnx_sha)
    assert out["data_version"] == clean_scores["record"]["data_version"] == version

    rows = query(home, "SELECT sha256, model, version, class, probability, pack FROM predictions")
    assert scores(rows) == want
    assert {(r["model"], r["version"], r["pack"]) for r in rows} == {("m", 1, "u")}
    labels = query(
        home, "SELECT pack_id, label, count(*) AS n FROM images GROUP BY ALL ORDER BY ALL"
    )
    folders = Counter(m.split("/")[0] for m in zip_members(packs["a"].read_bytes()))
    assert labels == [
        *({"pack_id": "a", "label": c, "n": n} for c, n in sorted(folders.items())),
        {"pack_id": "u", "label": None, "n": 30},
    ]  # as ingested: the predictions are a table of their own

    use_home(monkeypatch, home)
    ds = Datasets()
    cut = sorted(r["probability"] for r in want.values())[15]  # about half are above it
    above = {s for s, r in want.items() if r["probability"] > cut}
    subset = ds.freeze_dataset(
        "s2",
        "SELECT images.* FROM images JOIN predictions p USING (sha256) "
        f"WHERE images.label IS NULL AND p.probability > {cut!r}",
    )
    assert len(above) >= 10 and subset["rows"] == len(above)
    assert subset["labels"] == {"None": len(above)} and subset["packs"] == ["u"]
    ds.freeze_dataset(
        "s3",
        "SELECT * FROM images JOIN predictions p USING (sha256) "
        f"WHERE images.label IS NULL AND p.probability > {cut!r}",
    )
    for key in ("s2", "s3"):
        manifest = read_parquet(lake, f"subsets/{key}/manifest.parquet")
        assert set(manifest["sha256"].to_pylist()) == above
        assert set(manifest["pack_id"].to_pylist()) == {"u"}  # the images table's, no clash
    manifest = read_parquet(lake, "subsets/s3/manifest.parquet").to_pylist()
    assert scores(manifest) == {s: want[s] for s in above}  # the query's own columns, kept

    assert ds.predictions("u") == out
    records = ds.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PREDICTIONS), limit=10
    ).records
    assert len(records) == 1  # asked again: the lake had them, no run
    mat = records[0].event_log_entry.asset_materialization
    assert mat.partition == "u" and mat.tags["dagster/data_version"] == version
    meta = mat.metadata
    assert meta["images"].value == 30 and meta["scored_by"].value == out["scored_by"]
    for picture in ("confidence_histogram", "least_confident_images"):
        assert meta[picture].value.startswith(
            f"![{picture.replace('_', ' ')}](data:image/png;base64,"
        )


def test_kill_predictions_then_again_gives_the_uninterrupted_rows(
    trained_home, clean_scores, tmp_path, user_env, monkeypatch
):
    """`cvgraph predictions u` SIGKILLed (with its worker) after its progress lines (the step's
    start; the batch scored, before the part; the record written, before the step's end), then
    run again: the part's bytes and the record of the run no one interrupted, and no run left
    unfinished."""
    from orchestration.instance import instance
    from orchestration.liveness import unfinished_runs

    home = copy_home(trained_home, tmp_path / "home")
    env = labeller_env(user_env, home)
    kills = sum(
        killed_at(env, ["predictions", "u"], **point)
        for point in ({"after_line": 1}, {"after_line": 2}, {"after_line": 3})
    )
    assert kills == 3, "a kill landed after the command's end"
    out = json.loads(cvgraph(env, "predictions", "u", "--json").stdout)
    assert out == clean_scores["out"]
    lake = lake_of(home)
    assert lake.get("tables/predictions/u.parquet") == clean_scores["part"]
    assert json.loads(lake.get("packs/u/predictions/predictions.json")) == clean_scores["record"]
    use_home(monkeypatch, home)
    assert unfinished_runs(instance()) == []


def tick(sensor, ds, cursor: str | None):
    """One evaluation of ``sensor`` on the home's instance and resources."""
    context = dg.build_sensor_context(
        instance=ds.instance,
        cursor=cursor,
        resources={"lake": ds.resources["lake"], "labeller": ds.resources["labeller"]},
    )
    return sensor(context)


def test_a_new_champion_rescores_the_packs_it_has_not_scored(
    trained_home, packs, tmp_path, monkeypatch
):
    """The sensor asks for every pack not scored by the labeller's export; once scored, nothing.
    The champion named on that same export: nothing new. A later version exported while v1 is
    the champion: refused in one line. The alias moved to it: every pack re-scored by it (one
    pack's part replaced at a time), then nothing more. A pack forgotten: its rows go too."""
    import mlflow

    from cvgraph import Datasets
    from orchestration.sensors import pack_predictions_sensor
    from workloads.lake import read_parquet
    from workloads.predictions import scored_packs

    home = copy_home(trained_home, tmp_path / "home")
    use_home(monkeypatch, home)
    ds = Datasets()
    assert "pack_predictions" in {s.name for s in ds.definitions.sensors}

    def run(request) -> str:
        """Run one request of a tick; the pack's data version after it."""
        pack = request.partition_key
        ds.materialize([PREDICTIONS], partition_key=pack, tags=request.tags)
        return json.loads(ds.lake.get(f"packs/{pack}/predictions/predictions.json"))["data_version"]

    first = tick(pack_predictions_sensor, ds, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["a", "u"]
    v1 = {r.partition_key: run(r) for r in first.run_requests}
    second = tick(pack_predictions_sensor, ds, first.cursor)
    assert not second.run_requests
    assert second.skip_reason.skip_message == (
        "every pack is scored (m v1 (no champion yet: its latest export))"
    )
    registry = mlflow.MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
    registry.set_registered_model_alias("m", "champion", "1")  # as `cvgraph evaluate` does
    third = tick(pack_predictions_sensor, ds, second.cursor)
    assert not third.run_requests
    assert third.skip_reason.skip_message == "every pack is scored (m v1 (the champion))"

    ds.train("m", epochs=3)  # v2, on the same subset
    ds.export("m")
    refused = tick(pack_predictions_sensor, ds, third.cursor)
    assert refused.skip_message == (
        "labeller 'm': its champion is v1, but exports/m/exports.json is v2's export; packs are "
        "scored by the champion's export only: evaluate v2 (it becomes the champion if it "
        "scores higher) or set CVGRAPH_LABELLER to another model"
    )
    registry.set_registered_model_alias("m", "champion", "2")
    fourth = tick(pack_predictions_sensor, ds, third.cursor)
    requests = {r.partition_key: r for r in fourth.run_requests}
    assert sorted(requests) == ["a", "u"]
    u_part = ds.lake.get("tables/predictions/u.parquet")
    v2 = {"a": run(requests["a"])}
    assert ds.lake.get("tables/predictions/u.parquet") == u_part  # a re-score: a's part only
    v2["u"] = run(requests["u"])
    assert all(v2[p] != v1[p] for p in v2)
    for pack in ("a", "u"):
        rows = read_parquet(ds.lake, f"tables/predictions/{pack}.parquet").to_pylist()
        assert scores(rows) == expected(home, packs, pack)
        assert {(r["model"], r["version"], r["pack"]) for r in rows} == {("m", 2, pack)}
        latest = ds.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=PREDICTIONS, asset_partitions=[pack]), limit=1
        ).records[0]
        assert latest.event_log_entry.asset_materialization.tags["dagster/data_version"] == v2[pack]
    last = tick(pack_predictions_sensor, ds, fourth.cursor)
    assert not last.run_requests
    assert last.skip_reason.skip_message == "every pack is scored (m v2 (the champion))"

    ds.forget("pack", "u")  # its rows leave the table with it
    assert not ds.lake.exists("tables/predictions/u.parquet")
    assert set(scored_packs(ds.lake)) == {"a"}
    assert ds.sql_query(
        "SELECT pack, count(*) AS n FROM predictions GROUP BY pack"
    ).to_pylist() == [{"pack": "a", "n": 60}]
