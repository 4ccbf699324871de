"""A zip replaced under an ingested pack's key, as a user would meet it: the upload refuses to
overwrite it; bytes overwritten behind cvgraph's back (`aws s3 cp`) fail the pack's next run with
the recorded reason; the pack, its images and the subsets frozen from it stay as they were."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from pathlib import Path
from cvgraph import Datasets
from cvgraph.demo_packs import sample_image, zip_bytes
from cvgraph.errors import InvalidRequest, RunFailed
from cvgraph.torch import FrozenSubsetDataset
from assets.packs import PACK_KEY_TAG, raw_packs
from workloads.layout import pack_keys

tmp = Path(sys.argv[1])
first, other = tmp / "cups.zip", tmp / "cups-other.zip"
first.write_bytes(zip_bytes({"cup/coffee.png": sample_image("coffee.png"),
                             "cat/chelsea.png": sample_image("chelsea.png")}))
other.write_bytes(zip_bytes({"cup/china.jpg": sample_image("china.jpg")}))
out = {}
ds = Datasets()
ds.ingest(first)
ds.sync()
subset = ds.freeze_dataset("cups_v1", "SELECT * FROM images WHERE pack_id = 'cups'")
record_before = ds.lake.get(pack_keys("cups")["record"])
try:
    ds.upload(other, name="cups")
except InvalidRequest as e:
    out["upload"] = str(e)
out["zip_kept"] = ds.lake.get("incoming/cups.zip") == first.read_bytes()
ds.lake.put("incoming/cups.zip", other.read_bytes())  # behind cvgraph's back
try:
    ds.materialize([raw_packs.key], partition_key="cups", tags={PACK_KEY_TAG: "incoming/cups.zip"})
except RunFailed as e:
    out["run"] = str(e)
out["record_kept"] = ds.lake.get(pack_keys("cups")["record"]) == record_before
out["replaced"] = [json.loads(ds.lake.get(k)) for k in ds.lake.keys("packs/cups/replaced/")]
again = ds.subset("cups_v1")
out["subset_same"] = again["manifest_sha256"] == subset["manifest_sha256"]
data = FrozenSubsetDataset("cups_v1", split=None)
out["subset_items"] = [tuple(data[i][0].shape) for i in range(len(data))]
print(json.dumps(out))
"""


def test_a_replaced_zip_is_refused_and_the_subsets_frozen_from_it_keep_loading(tmp_path, user_env):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=user_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["upload"] == (
        "incoming/cups.zip holds ingested pack cups, and "
        f"{tmp_path / 'cups-other.zip'} has other bytes: upload it under a new name (--name), "
        "or `cvgraph forget pack cups` first"
    )
    assert out["zip_kept"] is True
    assert out["run"].startswith(
        "raw_packs: pack cups: incoming/cups.zip was replaced by other bytes (sha256 "
    )
    assert out["run"].endswith(
        "refused, the ingested pack is kept. Upload the new zip under a new name, or "
        "`cvgraph forget pack cups` and ingest it again"
    )
    assert out["record_kept"] is True
    [refusal] = out["replaced"]
    assert refusal["key"] == "incoming/cups.zip" and refusal["reason"] in out["run"]
    assert refusal["zip_sha256"] != refusal["ingested_zip_sha256"]
    assert out["subset_same"] is True
    assert len(out["subset_items"]) == 2 and all(s[0] == 3 for s in out["subset_items"])
