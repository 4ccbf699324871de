"""Hostile and odd packs: every bad member gets its exact reason, every good member is kept."""

import hashlib
import io
import json
import os
import stat
import struct
import unicodedata
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvgraph.demo_packs import sample_image, zip_bytes
from workloads.index import build_raw_index, committed_packs
from workloads.ingest import ingest_pack, main
from workloads.kernels import decode
from workloads.lake import parquet_table
from workloads.layout import pack_keys
from workloads.pack_zip import IngestLimits, PackUnreadable

# -- helpers ---------------------------------------------------------------------


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def png(seed: int, size=(48, 64)) -> bytes:
    """A small PNG with content unique to ``seed``."""
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def build_zip(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip from ``[(name or ZipInfo, bytes)]`` — names are written exactly as given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            info = (
                name
                if isinstance(name, zipfile.ZipInfo)
                else zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            )
            info.compress_type = compression
            if not isinstance(name, zipfile.ZipInfo):
                info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def unix_member(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def patch_headers(data: bytes, name: str, **fields) -> bytes:
    """Rewrite ``name``'s fields in both its local header and its central directory entry
    (what a hostile zip writer can do): flag, method, file_size."""
    local = {"flag": (6, "<H"), "method": (8, "<H"), "file_size": (22, "<I")}
    central = {"flag": (8, "<H"), "method": (10, "<H"), "file_size": (24, "<I")}
    out = bytearray(data)
    for sig, name_len_at, name_at, offsets in (
        (b"PK\x03\x04", 26, 30, local),
        (b"PK\x01\x02", 28, 46, central),
    ):
        i = out.find(sig)
        while i >= 0:
            n = struct.unpack_from("<H", out, i + name_len_at)[0]
            if out[i + name_at : i + name_at + n] == name.encode():
                for f, v in fields.items():
                    at, fmt = offsets[f]
                    struct.pack_into(fmt, out, i + at, v)
            i = out.find(sig, i + 4)
    return bytes(out)


def duplicate_central_entry(data: bytes, name: str) -> bytes:
    """Add a second central-directory entry for ``name`` pointing at the same bytes: the
    overlap that non-recursive zip bombs multiply."""
    eocd = data.rfind(b"PK\x05\x06")
    n_disk, n_total, cd_size, cd_offset = struct.unpack_from("<HHII", data, eocd + 8)
    cd = data[cd_offset : cd_offset + cd_size]
    i = cd.find(b"PK\x01\x02")
    while True:
        n, m, k = struct.unpack_from("<HHH", cd, i + 28)
        entry = cd[i : i + 46 + n + m + k]
        if entry[46 : 46 + n] == name.encode():
            break
        i += len(entry)
    tail = bytearray(data[eocd:])
    struct.pack_into("<HHI", tail, 8, n_disk + 1, n_total + 1, cd_size + len(entry))
    return data[:cd_offset] + cd + entry + bytes(tail)


def ingest(lake, name: str, data: bytes, limits=None):
    lake.put(f"incoming/{name}.zip", data)
    return ingest_pack(lake, name, f"incoming/{name}.zip", limits)


def manifest(lake, pack_id) -> dict[str, dict]:
    return {
        r["member"]: r for r in parquet_table(lake.get(pack_keys(pack_id)["manifest"])).to_pylist()
    }


def rejects(lake, pack_id) -> dict[str, str]:
    rows = parquet_table(lake.get(pack_keys(pack_id)["rejects"])).to_pylist()
    return {r["member"]: r["reason"] for r in rows}


def assert_reasons(reasons: dict[str, str], expected: dict[str, str]) -> None:
    """Exactly these members are rejected, each with a reason starting with the expected text."""
    assert set(reasons) == set(expected), (sorted(reasons), sorted(expected))
    wrong = {m: reasons[m] for m in expected if not reasons[m].startswith(expected[m])}
    assert not wrong, wrong


def raw_objects(lake) -> set[str]:
    return {o.key.rsplit("/", 1)[1].split(".")[0] for o in lake.list("raw/")}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


# -- 1. unreadable packs ------------------------------------------------------------


def test_not_a_zip_is_refused_with_a_recorded_reason(lake, capsys):
    with pytest.raises(
        PackUnreadable,
        match=r"pack junk \(incoming/junk.zip\) is not a readable zip: File is not a zip file",
    ):
        ingest(lake, "junk", b"GIF89a definitely not a zip")
    assert rejects(lake, "junk") == {"": "not a readable zip: File is not a zip file"}
    assert not lake.exists(pack_keys("junk")["record"]) and not lake.exists(
        pack_keys("junk")["manifest"]
    )
    # the CLI says so in its JSON line and exits with PackUnreadable's code
    assert main(["--lake", str(lake.root), "--pack-id", "junk", "--key", "incoming/junk.zip"]) == 3
    assert "not a readable zip" in json.loads(capsys.readouterr().out.splitlines()[0])["error"]


def test_truncated_zip_without_central_directory_is_unreadable_as_a_whole(lake):
    whole = build_zip([(f"a/{i}.png", png(i)) for i in range(6)], zipfile.ZIP_STORED)
    with pytest.raises(PackUnreadable, match="truncated"):
        ingest(lake, "cut", whole[: len(whole) // 2])
    assert rejects(lake, "cut") == {
        "": "not a readable zip: truncated (member data but no central directory)"
    }
    assert committed_packs(lake) == [] and raw_objects(lake) == set()
    # the whole upload then ingests normally under the same id
    assert ingest(lake, "cut", whole).accepted == 6 and committed_packs(lake) == ["cut"]


def test_corrupt_member_data_loses_only_that_member(lake):
    good, bad = png(1), png(2)
    data = bytearray(build_zip([("a/good.png", good), ("a/bad.png", bad)], zipfile.ZIP_STORED))
    at = bytes(data).find(bad[200:232])
    data[at : at + 32] = bytes(32)  # damage the stored bytes, headers intact
    ingest(lake, "damaged", bytes(data))
    assert set(manifest(lake, "damaged")) == {"a/good.png"}
    assert_reasons(rejects(lake, "damaged"), {"a/bad.png": "corrupt member: CRC-32 mismatch"})


# -- 2. members escaping the root -----------------------------------------------------


def test_members_escaping_the_root_are_rejected_and_nothing_is_written_outside_the_lake(
    lake, tmp_path, monkeypatch
):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(
        tempfile, "tempdir", str(scratch)
    )  # the ingest's own temp files, watched too
    bad = {
        "../x.png": "unsafe path: escapes the pack root (..)",
        "a/../../x.png": "unsafe path: escapes the pack root (..)",
        "..\\x.png": "unsafe path: escapes the pack root (..)",
        "a\\..\\..\\x.png": "unsafe path: escapes the pack root (..)",
        "a/../x.png": "unsafe path: '..' in member path",
        "/etc/x.png": "unsafe path: absolute member path",
        "\\x.png": "unsafe path: absolute member path",
        "C:\\x.png": "unsafe path: Windows drive path",
        "C:/Windows/x.png": "unsafe path: Windows drive path",
    }
    entries = [(name, png(i)) for i, name in enumerate(bad)]
    entries += [
        (unix_member("cats/link.png", stat.S_IFLNK | 0o777), b"../../../../etc/passwd"),
        (unix_member("cats/link2.png", stat.S_IFLNK | 0o777), b"real.png"),
        (unix_member("cats/fifo.png", stat.S_IFIFO | 0o644), png(50)),
        (unix_member("cats/real.png", stat.S_IFREG | 0o644), png(51)),
        ("cats\\windows.png", png(52)),  # a backslash separator, inside the root: kept
        ("ok/good.png", png(53)),
    ]
    bad |= {
        "cats/link.png": "symlink member: not followed",
        "cats/link2.png": "symlink member: not followed",
        "cats/fifo.png": "special file member (type p)",
    }
    before = tree(tmp_path)
    ingest(lake, "escape", build_zip(entries))
    rows = manifest(lake, "escape")
    assert set(rows) == {"cats/real.png", "cats\\windows.png", "ok/good.png"}
    assert rows["cats\\windows.png"]["label"] == "cats"
    assert_reasons(rejects(lake, "escape"), bad)
    assert raw_objects(lake) == {sha(png(i)) for i in (51, 52, 53)}
    added = tree(tmp_path) - before
    assert added and all(p.startswith("lake" + os.sep) for p in added), sorted(added)
    assert tree(scratch) == set()  # temp files cleaned up
    assert (
        not Path("/etc/x.png").exists()
        and not list(tmp_path.rglob("x.png"))
        and not (tmp_path.parent / "x.png").exists()
    )


# -- 3. zip bombs -----------------------------------------------------------------------


def test_limits_come_from_the_environment(monkeypatch):
    for name in ("MAX_MEMBER_BYTES", "MAX_TOTAL_BYTES", "MAX_RATIO", "MAX_MEMBERS", "MAX_PIXELS"):
        monkeypatch.delenv(f"CVGRAPH_INGEST_{name}", raising=False)
    assert IngestLimits.from_env() == IngestLimits()
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_RATIO", "50.5")
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_MEMBERS", "10")
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_TOTAL_BYTES", "1_000_000")
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_MEMBER_BYTES", "4096")
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_PIXELS", "1000000")
    assert IngestLimits.from_env() == IngestLimits(
        max_member_bytes=4096,
        max_total_bytes=1_000_000,
        max_ratio=50.5,
        max_members=10,
        max_pixels=1_000_000,
    )
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_MEMBERS", "lots")
    with pytest.raises(ValueError, match="CVGRAPH_INGEST_MAX_MEMBERS='lots' is not a number"):
        IngestLimits.from_env()
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_MEMBERS", "0")
    with pytest.raises(ValueError, match="must be positive"):
        IngestLimits.from_env()


def test_ratio_member_size_and_total_limits_reject_members_and_keep_the_rest(lake):
    a, b, c, big = png(1), png(2), png(3), png(4, size=(300, 300))
    zeros = b"\x00" * 90_000  # deflates ~500x, under the member size limit
    entries = [
        ("k/a.png", a),
        ("k/zeros.png", zeros),
        ("k/big.png", big),
        ("k/b.png", b),
        ("k/c.png", c),
    ]
    limits = IngestLimits(
        max_ratio=200, max_member_bytes=100_000, max_total_bytes=len(a) + len(b) + len(c) - 1
    )
    res = ingest(lake, "bombs", build_zip(entries), limits)
    assert set(manifest(lake, "bombs")) == {"k/a.png", "k/b.png"} and res.accepted == 2
    assert_reasons(
        rejects(lake, "bombs"),
        {
            "k/zeros.png": "zip bomb: compression ratio ",
            "k/big.png": f"zip bomb: member is {len(big)} bytes > limit 100000",
            "k/c.png": f"zip bomb: pack total {len(a) + len(b) + len(c)} bytes > limit {limits.max_total_bytes}",
        },
    )
    ratio = rejects(lake, "bombs")["k/zeros.png"]
    assert ratio.endswith("> limit 200") and int(ratio.split()[4]) > 500


def test_too_many_members_refuses_the_pack_as_a_whole(lake, monkeypatch, capsys):
    entries = [
        ("d/", b""),
        *[(f"d/{i}.png", png(i)) for i in range(4)],
    ]  # a directory entry does not count
    res = ingest(lake, "four", build_zip(entries), IngestLimits(max_members=4))
    assert res.accepted == 4
    with pytest.raises(PackUnreadable, match=r"zip bomb: 4 members > limit 3"):
        ingest(lake, "many", build_zip(entries), IngestLimits(max_members=3))
    assert rejects(lake, "many") == {"": "zip bomb: 4 members > limit 3"}
    assert committed_packs(lake) == ["four"]
    # the CLI takes the limit from the environment
    monkeypatch.setenv("CVGRAPH_INGEST_MAX_MEMBERS", "3")
    assert main(["--lake", str(lake.root), "--pack-id", "many", "--key", "incoming/many.zip"]) == 3
    assert "zip bomb: 4 members > limit 3" in capsys.readouterr().out


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_header_that_lies_about_the_size_is_not_trusted(lake, method):
    small, big, liar_low, liar_high = png(1), png(2), png(3, size=(200, 200)), png(4)
    data = build_zip(
        [
            ("x/small.png", small),
            ("x/liar_low.png", liar_low),
            ("x/liar_high.png", liar_high),
            ("x/big.png", big),
        ],
        method,
    )
    data = patch_headers(data, "x/liar_low.png", file_size=1000)  # really ~120 kB
    data = patch_headers(data, "x/liar_high.png", file_size=len(liar_high) + 5)
    ingest(lake, f"liar{method}", data)
    assert set(manifest(lake, f"liar{method}")) == {"x/small.png", "x/big.png"}
    assert_reasons(
        rejects(lake, f"liar{method}"),
        {
            "x/liar_low.png": "zip bomb: member data is larger than its header says (1000 bytes)",
            "x/liar_high.png": f"corrupt member: {len(liar_high)} bytes of data, its header says {len(liar_high) + 5}",
        },
    )


def test_overlapping_encrypted_and_unsupported_members(lake):
    a, b, c, d = png(1), png(2), png(3), png(4)
    data = build_zip([("m/a.png", a), ("m/b.png", b), ("m/c.png", c), ("m/d.png", d)])
    data = duplicate_central_entry(data, "m/a.png")  # m/a.png listed twice, one set of bytes
    data = patch_headers(data, "m/b.png", flag=0x1)
    data = patch_headers(data, "m/c.png", method=9)
    ingest(lake, "odd", data)
    rows = manifest(lake, "odd")
    assert set(rows) == {"m/a.png", "m/d.png"} and rows["m/a.png"]["sha256"] == sha(a)
    assert_reasons(
        rejects(lake, "odd"),
        {
            "m/a.png": "zip bomb: member data overlaps another member's",
            "m/b.png": "encrypted member: no password",
            "m/c.png": "unsupported compression method 9 (deflate64)",
        },
    )


def test_labels_files_are_held_to_the_same_limits(lake):
    coco = b'{"images": [], "annotations": [], "categories": []' + b" " * 3_000_000 + b"}"
    data = build_zip(
        [
            ("labels.csv", "\ufeffmember,label\ncats/a.png,kitten\n".encode()),
            ("annotations.json", coco),
            ("cats/a.png", png(1)),
            ("cats/b.png", png(2)),
        ]
    )
    ingest(lake, "meta", data, IngestLimits(max_ratio=100))
    rows = manifest(lake, "meta")
    assert {m: (r["label"], r["label_source"]) for m, r in rows.items()} == {
        "cats/a.png": ("kitten", "labels.csv"),  # a BOM (Excel) does not hide the header
        "cats/b.png": ("cats", "folder"),
    }
    assert_reasons(
        rejects(lake, "meta"),
        {"annotations.json": "unreadable labels/annotations: zip bomb: compression ratio"},
    )


# -- 4. nested archives, non-images, bad images, decompression bombs -----------------------------


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all zeros: ~50 kB on disk for 20000x20000."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = 1 + (width + 7) // 8
    z = zlib.compressobj(9)
    idat = z.compress(bytes(row * height)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def test_nested_archives_non_images_bad_images_and_decompression_bombs(lake, monkeypatch):
    from PIL import ImageFile

    loaded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: (loaded.append(self.size), real_load(self))[1]
    )
    jpeg = sample_image("china.jpg")
    bomb = png_header_bomb(20000, 20000)
    assert len(bomb) < 200_000
    members = {
        "n/inner.zip": zip_bytes({"a.png": png(9)}),
        "n/data.tar.gz": b"\x1f\x8b\x08\x00" + bytes(100),
        "n/stuff.7z": b"7z\xbc\xaf\x27\x1c" + bytes(100),
        "n/notes.txt": b"hello",
        "n/README": b"read me",
        "n/empty.png": b"",
        "n/truncated.jpg": jpeg[: len(jpeg) // 2],
        "n/garbage.png": b"\x89PNG\r\n\x1a\n not really",
        "n/text.jpg": b"plain text named like a photo",
        "n/bomb.png": bomb,
        "n/ok.jpg": jpeg,
        "n/ok.png": png(1),
    }
    ingest(lake, "mixed", zip_bytes(members))
    assert set(manifest(lake, "mixed")) == {"n/ok.jpg", "n/ok.png"}
    assert_reasons(
        rejects(lake, "mixed"),
        {
            "n/inner.zip": "nested archive (.zip): not unpacked",
            "n/data.tar.gz": "nested archive (.tar.gz): not unpacked",
            "n/stuff.7z": "nested archive (.7z): not unpacked",
            "n/notes.txt": "not an image: extension .txt",
            "n/README": "not an image: extension (none)",
            "n/empty.png": "empty file (0 bytes)",
            "n/truncated.jpg": "undecodable image: OSError",
            "n/garbage.png": "undecodable image",
            "n/text.jpg": "undecodable image",
            "n/bomb.png": f"decompression bomb: 20000x20000 = 400000000 pixels > limit {IngestLimits().max_pixels}",
        },
    )
    assert (20000, 20000) not in loaded  # refused from its header, never decoded
    assert sha(bomb) not in raw_objects(lake)


# -- 5. duplicates ----------------------------------------------------------------------------


def test_duplicates_across_packs_under_other_names_point_to_one_object(lake):
    same, other = png(1), png(2)
    r1 = ingest(lake, "first", zip_bytes({"cats/tom.png": same, "cats/again.png": same}))
    r2 = ingest(
        lake, "second", zip_bytes({"felines/renamed.png": same, "felines/other.png": other})
    )
    assert (r1.accepted, r1.duplicates, r2.accepted, r2.duplicates) == (1, 1, 1, 1)
    m1, m2 = manifest(lake, "first"), manifest(lake, "second")
    assert (
        m1["cats/tom.png"]["sha256"]
        == m1["cats/again.png"]["sha256"]
        == m2["felines/renamed.png"]["sha256"]
        == sha(same)
    )
    statuses = {m: r["status"] for m, r in {**m1, **m2}.items()}
    assert statuses == {
        "cats/tom.png": "new",
        "cats/again.png": "duplicate",
        "felines/renamed.png": "duplicate",
        "felines/other.png": "new",
    }
    assert [o.key for o in lake.list("raw/")] == sorted(
        f"raw/{sha(b)[:2]}/{sha(b)}.png" for b in (same, other)
    )
    build_raw_index(lake, [sha(same)[:2]])
    row = next(
        r
        for r in parquet_table(lake.get(f"index/raw/{sha(same)[:2]}.parquet")).to_pylist()
        if r["sha256"] == sha(same)
    )
    assert row["packs"] == ["first", "second"]
    assert row["members"] == [
        "first/cats/again.png",
        "first/cats/tom.png",
        "second/felines/renamed.png",
    ]


# -- 6. OS junk and odd names ------------------------------------------------------------------


def test_os_junk_is_skipped_and_odd_names_are_kept_with_their_folder_label(lake):
    long_name = "long/" + "x" * 1000 + ".png"
    nfd = unicodedata.normalize("NFD", "café") + "/mac.png"  # how macOS writes names
    junk = {
        "__MACOSX/cats/._a.png": b"\x00\x05\x16\x07",
        "cats/._a.png": b"\x00\x05\x16\x07",
        "Thumbs.db": b"junk",
        "cats/.DS_Store": b"junk",
        "Desktop.ini": b"junk",
        "@eaDir/a.png/SYNOFILE_THUMB_M.png": png(99),
    }
    odd = {
        "café/naïve 🐱.png": ("café", png(1)),
        "with space/a b.png": ("with space", png(2)),
        "hash#/x#1.png": ("hash#", png(3)),
        "pct%/50%25 off.png": ("pct%", png(4)),
        long_name: ("long", png(5)),
        nfd: ("café", png(6)),
        "./dotted/x.png": ("dotted", png(7)),
        "loose.png": (None, png(8)),
    }
    res = ingest(lake, "odd-names", zip_bytes({**junk, **{m: d for m, (_, d) in odd.items()}}))
    assert res.skipped == len(junk) and res.rejected == []
    assert rejects(lake, "odd-names") == {}
    rows = manifest(lake, "odd-names")
    assert {m: r["label"] for m, r in rows.items()} == {m: label for m, (label, _) in odd.items()}
    assert res.labels == {
        "(none)": 1,
        "café": 2,
        "dotted": 1,
        "hash#": 1,
        "long": 1,
        "pct%": 1,
        "with space": 1,
    }


# -- 7. image modes: ingest sizes and kernel decode agree, as displayed --------------------------------


def quadrants(w: int, h: int) -> np.ndarray:
    """RGB image: top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 0)
    return a


def with_orientation(arr: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(
        Image.fromarray(arr), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})
    )


BGR = {
    "red": (0, 0, 255),
    "green": (0, 255, 0),
    "blue": (255, 0, 0),
    "yellow": (0, 255, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


def mode_cases() -> dict[str, tuple[bytes, tuple[int, int], dict]]:
    """member -> (bytes, displayed (w, h), {(fx, fy) relative position: expected BGR})."""
    cases = {}
    cases["gray.png"] = (
        pil_bytes(Image.new("L", (64, 48), 100), "PNG"),
        (64, 48),
        {(0.5, 0.5): (100, 100, 100)},
    )
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 128)  # half-transparent red on white → pink
    rgba[:, 32:] = (0, 0, 255, 255)  # opaque blue
    cases["rgba.png"] = (
        pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"),
        (64, 48),
        {(0.25, 0.5): (127, 127, 255), (0.75, 0.5): BGR["blue"]},
    )
    la = np.zeros((48, 64, 2), np.uint8)
    la[:, 32:] = (0, 255)  # left: transparent (white), right: opaque black
    cases["la.png"] = (
        pil_bytes(Image.fromarray(la, "LA"), "PNG"),
        (64, 48),
        {(0.25, 0.5): BGR["white"], (0.75, 0.5): BGR["black"]},
    )
    deep = np.full((48, 64), 1000, np.uint16)
    deep[:, 32:] = 40000  # 40000/65535 → 156 (clipping would give 255)
    for fmt in ("png", "tif"):
        cases[f"deep16.{fmt}"] = (
            pil_bytes(Image.fromarray(deep), "PNG" if fmt == "png" else "TIFF"),
            (64, 48),
            {(0.25, 0.5): (4, 4, 4), (0.75, 0.5): (156, 156, 156)},
        )
    bgra16 = np.zeros((48, 64, 4), np.uint16)
    bgra16[:] = (0, 0, 65535, 32896)  # 16-bit red at alpha ~0.5
    cases["rgba16.png"] = (
        cv2.imencode(".png", bgra16)[1].tobytes(),
        (64, 48),
        {(0.5, 0.5): (127, 127, 255)},
    )
    bgra = np.zeros((48, 64, 4), np.uint8)
    bgra[:, :32] = (0, 0, 255, 128)
    bgra[:, 32:] = (255, 0, 0, 255)
    cases["alpha.bmp"] = (
        cv2.imencode(".bmp", bgra)[1].tobytes(),
        (64, 48),
        {(0.25, 0.5): (127, 127, 255), (0.75, 0.5): BGR["blue"]},
    )
    views = [
        Image.new("RGB", (64, 48), c) for c in ("red", "blue")
    ]  # MPO: the first view is the image
    cases["stereo.jpg"] = (
        pil_bytes(views[0], "MPO", save_all=True, append_images=views[1:], quality=95),
        (64, 48),
        {(0.5, 0.5): BGR["red"]},
    )
    cases["cmyk.jpg"] = (
        pil_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95),
        (64, 48),
        {(0.5, 0.5): BGR["red"]},
    )
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (32, 0, 64, 48))
    cases["palette.png"] = (
        pil_bytes(pal, "PNG"),
        (64, 48),
        {(0.25, 0.5): BGR["red"], (0.75, 0.5): BGR["green"]},
    )
    cases["palette_trns.png"] = (
        pil_bytes(pal, "PNG", transparency=0),
        (64, 48),
        {(0.25, 0.5): BGR["white"], (0.75, 0.5): BGR["green"]},
    )
    cases["palette_trns.gif"] = (
        pil_bytes(pal, "GIF", transparency=0),
        (64, 48),
        {(0.25, 0.5): BGR["white"], (0.75, 0.5): BGR["green"]},
    )
    gray_key = Image.new("L", (64, 48), 0)
    gray_key.paste(200, (32, 0, 64, 48))
    cases["gray_trns.png"] = (
        pil_bytes(gray_key, "PNG", transparency=0),
        (64, 48),
        {(0.25, 0.5): BGR["white"], (0.75, 0.5): (200, 200, 200)},
    )
    # Stored 96x64 with coloured quadrants. Orientation 6 = rotate 90° clockwise to display, so
    # the displayed top-left is the stored bottom-left (blue); 8 = counter-clockwise: stored
    # top-right (green); 3 = 180°: stored bottom-right (yellow).
    stored = quadrants(96, 64)
    expected = {
        1: (
            (96, 64),
            {(0.25, 0.25): BGR["red"], (0.75, 0.25): BGR["green"], (0.25, 0.75): BGR["blue"]},
        ),
        6: (
            (64, 96),
            {(0.25, 0.25): BGR["blue"], (0.75, 0.25): BGR["red"], (0.25, 0.75): BGR["yellow"]},
        ),
        8: (
            (64, 96),
            {(0.25, 0.25): BGR["green"], (0.75, 0.25): BGR["yellow"], (0.25, 0.75): BGR["red"]},
        ),
        3: (
            (96, 64),
            {(0.25, 0.25): BGR["yellow"], (0.75, 0.25): BGR["blue"], (0.25, 0.75): BGR["green"]},
        ),
    }
    for o, (size, probes) in expected.items():
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
            cases[f"exif{o}.{ext}"] = (with_orientation(stored, fmt, o), size, probes)
    return cases


@pytest.mark.parametrize("fast", [True, False])
def test_image_modes_are_normalised_as_displayed(lake, fast):
    cases = mode_cases()
    ingest(lake, "modes", zip_bytes({f"m/{name}": data for name, (data, _, _) in cases.items()}))
    assert rejects(lake, "modes") == {}
    rows = manifest(lake, "modes")
    assert rows["m/stereo.jpg"]["format"] == "MPO" and rows["m/alpha.bmp"]["format"] == "BMP"
    failures = []
    for name, (data, size, probes) in cases.items():
        row = rows[f"m/{name}"]
        assert (row["width"], row["height"]) == size, name  # ingest records the displayed size
        img = decode(
            lake.get(f"raw/{row['prefix']}/{row['sha256']}.{row['ext']}"),
            row["format"],
            row["width"],
            row["height"],
            8,
            fast=fast,
        )
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        h, w = img.shape[:2]
        if not fast:
            assert (w, h) == size, name
        assert w * size[1] == h * size[0], name  # a DCT-scaled decode keeps the displayed aspect
        for (fx, fy), want in probes.items():
            got = img[int(fy * h), int(fx * w)].astype(int)
            if np.abs(got - np.array(want)).max() > 12:
                failures.append((name, (fx, fy), got.tolist(), want))
    assert not failures, failures
