import hashlib
import io
import json
import zipfile

import pytest

from cvgraph.demo_packs import sample_image as photo
from cvgraph.demo_packs import zip_bytes
from workloads.ingest import ingest_pack
from workloads.lake import parquet_table
from workloads.layout import pack_keys
from workloads.pack_zip import IngestLimits, PackUnreadable


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def manifest(lake, pack_id):
    return parquet_table(lake.get(pack_keys(pack_id)["manifest"])).to_pylist()


def rejects(lake, pack_id):
    return {
        r["member"]: r["reason"]
        for r in parquet_table(lake.get(pack_keys(pack_id)["rejects"])).to_pylist()
    }


def test_folder_labels_content_addressing_and_manifest(lake, put_pack):
    china, coffee = photo("china.jpg"), photo("coffee.png")
    key = put_pack(
        "p1",
        {"building/china.jpg": china, "cup/coffee.png": coffee, "loose.png": photo("camera.png")},
    )
    res = ingest_pack(lake, "p1", key)
    assert (res.accepted, res.duplicates, res.rejected) == (3, 0, [])
    assert lake.get(f"raw/{sha(china)[:2]}/{sha(china)}.jpg") == china
    assert lake.get(f"raw/{sha(coffee)[:2]}/{sha(coffee)}.png") == coffee
    rows = {r["member"]: r for r in manifest(lake, "p1")}
    assert rows["building/china.jpg"]["label"] == "building"
    assert rows["cup/coffee.png"]["label"] == "cup"
    assert rows["loose.png"]["label"] is None
    assert (rows["building/china.jpg"]["width"], rows["building/china.jpg"]["height"]) == (640, 427)
    assert rows["cup/coffee.png"]["format"] == "PNG"
    assert json.loads(lake.get(pack_keys("p1")["record"]))["accepted"] == 3


def test_labels_csv_and_coco_boxes_override_folders(lake, put_pack):
    coco = {
        "images": [{"id": 1, "file_name": "a/chelsea.png"}],
        "categories": [{"id": 7, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 30, 40]}],
    }
    key = put_pack(
        "p2",
        {
            "a/chelsea.png": photo("chelsea.png"),
            "a/coffee.png": photo("coffee.png"),
            "labels.csv": b"member,label\na/coffee.png,mug\n",
            "annotations.json": json.dumps(coco).encode(),
        },
    )
    res = ingest_pack(lake, "p2", key)
    rows = {r["member"]: r for r in manifest(lake, "p2")}
    assert res.accepted == 2 and set(rows) == {"a/chelsea.png", "a/coffee.png"}
    assert rows["a/coffee.png"]["label"] == "mug"
    assert rows["a/chelsea.png"]["label"] == "cat"
    assert rows["a/chelsea.png"]["boxes"] == [
        {"category": "cat", "x": 1.0, "y": 2.0, "w": 30.0, "h": 40.0, "iscrowd": False}
    ]


def test_duplicates_inside_and_across_packs_are_counted_and_stored_once(lake, put_pack):
    china = photo("china.jpg")
    r1 = ingest_pack(lake, "one", put_pack("one", {"x/china.jpg": china, "x/copy.jpg": china}))
    r2 = ingest_pack(
        lake, "two", put_pack("two", {"y/china.jpg": china, "y/flower.jpg": photo("flower.jpg")})
    )
    assert (r1.accepted, r1.duplicates) == (1, 1)
    assert (r2.accepted, r2.duplicates) == (1, 1)
    assert [o.key for o in lake.list(f"raw/{sha(china)[:2]}/")] == [
        f"raw/{sha(china)[:2]}/{sha(china)}.jpg"
    ]


def test_bad_members_get_reasons_and_good_members_are_kept(lake, put_pack):
    good = photo("astronaut.png")
    jpeg = photo("china.jpg")
    members = {
        "ok/astronaut.png": good,
        "notes.txt": b"hello",
        "../evil.png": good,
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "garbage.png": b"\x89PNG not really",
        "inner.zip": zip_bytes({"a.png": good}),
        "__MACOSX/ok/._astronaut.png": b"\x00\x05",
        "Thumbs.db": b"junk",
    }
    res = ingest_pack(lake, "bad", put_pack("bad", members))
    assert res.accepted == 1 and res.skipped == 2
    reasons = rejects(lake, "bad")
    assert set(reasons) == {
        "notes.txt",
        "../evil.png",
        "empty.png",
        "truncated.jpg",
        "garbage.png",
        "inner.zip",
    }
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["../evil.png"].startswith("unsafe path")
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("undecodable image")
    assert reasons["garbage.png"].startswith("undecodable image")
    assert reasons["inner.zip"].startswith("nested archive")
    assert [r["member"] for r in manifest(lake, "bad")] == ["ok/astronaut.png"]
    assert not list(lake.root.parent.glob("evil.png"))


def test_decompression_bomb_and_ratio_limits(lake, put_pack):
    import cv2
    import numpy as np

    ok, big = cv2.imencode(".png", np.zeros((3000, 3000), np.uint8))  # compresses ~1000x
    key = put_pack("bombs", {"big.png": big.tobytes(), "fine.jpg": photo("china.jpg")})
    res = ingest_pack(lake, "bombs", key, IngestLimits(max_pixels=4_000_000))
    assert res.accepted == 1
    assert rejects(lake, "bombs")["big.png"].startswith("decompression bomb: 3000x3000")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\x00" * 5_000_000)
        zf.writestr("fine.jpg", photo("china.jpg"))
    lake.put("incoming/ratio.zip", buf.getvalue())
    res = ingest_pack(lake, "ratio", "incoming/ratio.zip", IngestLimits(max_ratio=100))
    assert res.accepted == 0 and res.duplicates == 1  # china.jpg already stored by the first pack
    assert rejects(lake, "ratio")["zeros.png"].startswith("zip bomb: compression ratio")


def test_not_a_zip_is_refused_with_a_recorded_reason(lake):
    lake.put("incoming/broken.zip", b"this is not a zip file")
    with pytest.raises(PackUnreadable, match="broken .*not a readable zip"):
        ingest_pack(lake, "broken", "incoming/broken.zip")
    assert next(iter(rejects(lake, "broken").values())).startswith("not a readable zip")
    assert not lake.exists(pack_keys("broken")["record"])


def test_reingest_of_the_same_pack_converges(lake, put_pack):
    key = put_pack("same", {"a/china.jpg": photo("china.jpg"), "b/coffee.png": photo("coffee.png")})
    first = ingest_pack(lake, "same", key)
    before = {k: lake.get(k) for k in pack_keys("same").values()}
    again = ingest_pack(lake, "same", key)
    assert again.to_json() == first.to_json()
    assert {k: lake.get(k) for k in pack_keys("same").values()} == before


def test_a_replaced_zip_is_refused_with_a_recorded_reason_and_the_pack_kept(lake, put_pack):
    from workloads.ingest import PackReplaced
    from workloads.layout import replaced_key

    key = put_pack("cups", {"cup/coffee.png": photo("coffee.png")})
    first = ingest_pack(lake, "cups", key)
    before = {k: lake.get(k) for k in [*pack_keys("cups").values(), *lake.keys("raw/")]}
    other = zip_bytes(
        {"cup/coffee.png": photo("coffee.png"), "cat/chelsea.png": photo("chelsea.png")}
    )
    lake.put(key, other)  # overwritten in place, as `aws s3 cp` would
    with pytest.raises(PackReplaced, match=r"pack cups: incoming/cups.zip was replaced by other"):
        ingest_pack(lake, "cups", key)
    refusal = json.loads(lake.get(replaced_key("cups", sha(other))))
    assert refusal == {
        "pack_id": "cups",
        "key": key,
        "zip_sha256": sha(other),
        "ingested_zip_sha256": first.zip_sha256,
        "reason": refusal["reason"],
    }
    assert "refused, the ingested pack is kept" in refusal["reason"]
    # nothing of the ingested pack changed, and nothing of the new zip was stored
    assert {k: lake.get(k) for k in before} == before
    assert sorted(lake.keys("raw/")) == sorted(k for k in before if k.startswith("raw/"))
    # refused again the same way: the same record, byte for byte
    with pytest.raises(PackReplaced):
        ingest_pack(lake, "cups", key)
    assert lake.keys("packs/cups/replaced/") == [replaced_key("cups", sha(other))]
    # the original bytes back: the pack is as it was
    lake.put(key, zip_bytes({"cup/coffee.png": photo("coffee.png")}))
    assert ingest_pack(lake, "cups", key).to_json() == first.to_json()
