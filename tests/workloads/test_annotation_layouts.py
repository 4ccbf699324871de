"""Annotation layouts as downloads and exporters ship them, built here member by member: a whole
COCO ``annotations/`` folder (instances, keypoints, captions, stuff, panoptic and its mask PNGs),
COCO crowd boxes, CVAT's YOLO 1.1 (Darknet) export, and VOC xmls whose ``<filename>`` is not in
the pack. Exact boxes in pixels, ``iscrowd``, labels, and the reason for everything not read."""

import io
import json

import pyarrow as pa
from PIL import Image

from resources.catalog import DuckDBCatalog
from resources.storage import LakeResource
from workloads.annotation_formats import COCO_SKIPPED, parse_coco
from workloads.annotations import BOX_TYPE
from workloads.image_params import ImageParams
from workloads.index import (
    INDEX_SCHEMA,
    build_raw_index,
    merge_prefix,
    read_index,
    rebuild_raw_index,
)
from workloads.ingest import ingest_pack
from workloads.kernels import EdgeParams, ResizeParams
from workloads.lake import read_parquet, write_parquet
from workloads.layout import pack_keys, tables_state_key
from workloads.table_rows import OBJECTS_SCHEMA, ROWS_VERSION
from workloads.tables import read_prefix_table, write_prefix_tables
from workloads.versions import HASH_PREFIXES


def image(w: int, h: int, colour: tuple, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format=fmt)
    return buf.getvalue()


def box(category: str, x, y, w, h, iscrowd: bool = False) -> dict:
    return {
        "category": category,
        "x": float(x),
        "y": float(y),
        "w": float(w),
        "h": float(h),
        "iscrowd": iscrowd,
    }


def ingest(lake, put_pack, name: str, members: dict[str, bytes]):
    result = ingest_pack(lake, name, put_pack(name, members))
    rows = {r["member"]: r for r in read_parquet(lake, pack_keys(name)["manifest"]).to_pylist()}
    rejects = sorted((r["member"], r["reason"]) for r in result.rejected)
    return result, rows, rejects


def catalog_of(lake) -> DuckDBCatalog:
    """The lake's tables brought up to date, and a DuckDB catalog over them."""
    params = ImageParams(ResizeParams(size=16), EdgeParams())
    build_raw_index(lake, list(HASH_PREFIXES))
    for p in HASH_PREFIXES:
        write_prefix_tables(lake, p, params)
    return DuckDBCatalog(lake=LakeResource(url=str(lake.root)))


SKY, GRASS = 149, 124  # COCO-Stuff category ids
STUFF_CATEGORIES = [
    {"supercategory": "sky", "id": SKY, "name": "sky-other"},
    {"supercategory": "plant", "id": GRASS, "name": "grass"},
    {"supercategory": "other", "id": 183, "name": "other"},
]


def coco_annotations_folder() -> dict[str, bytes]:
    """val2017/ and annotations/ as the COCO 2017 download (and COCO-Stuff, and the panoptic
    annotations unzipped beside their json) lay them out, four images of 64x48."""
    images = [
        {"id": 139, "file_name": "000000000139.jpg", "width": 64, "height": 48},
        {"id": 285, "file_name": "000000000285.jpg", "width": 64, "height": 48},
        {"id": 632, "file_name": "000000000632.jpg", "width": 64, "height": 48},
        {"id": 776, "file_name": "000000000776.jpg", "width": 64, "height": 48},
    ]
    person = {"supercategory": "person", "id": 1, "name": "person"}
    tv = {"supercategory": "electronic", "id": 72, "name": "tv"}
    instances = [  # 139: a tv and two crowds of people; 285: one person; 632: a crowd only
        {"id": 10, "image_id": 139, "category_id": 72, "bbox": [40, 10, 12, 8], "iscrowd": 0},
        {"id": 11, "image_id": 139, "category_id": 1, "bbox": [0, 20, 30, 28], "iscrowd": 1},
        {"id": 12, "image_id": 139, "category_id": 1, "bbox": [30, 24, 20, 24], "iscrowd": 1},
        {"id": 13, "image_id": 285, "category_id": 1, "bbox": [2.5, 4, 40, 40], "iscrowd": 0},
        {"id": 14, "image_id": 632, "category_id": 1, "bbox": [8, 8, 16, 16], "iscrowd": 1},
    ]
    for a in instances:
        a["segmentation"] = (
            [[0, 0, 1, 0, 1, 1]] if not a["iscrowd"] else {"counts": "x", "size": [48, 64]}
        )
        a["area"] = a["bbox"][2] * a["bbox"][3]
    keypoints = [  # the same person annotations, with 17 keypoints each
        {**a, "keypoints": [0] * 51, "num_keypoints": 0} for a in instances if a["category_id"] == 1
    ]
    stuff = [  # 139's sky and grass: three regions, more than its one tv
        {
            "id": 20 + i,
            "image_id": 139,
            "category_id": cat,
            "bbox": bb,
            "iscrowd": 0,
            "segmentation": {"counts": "y", "size": [48, 64]},
        }
        for i, (cat, bb) in enumerate(
            [(SKY, [0, 0, 64, 20]), (SKY, [0, 0, 10, 10]), (GRASS, [0, 30, 64, 18])]
        )
    ]
    panoptic = {
        "images": images,
        "categories": [{**person, "isthing": 1}, {"id": 187, "name": "sky", "isthing": 0}],
        "annotations": [
            {
                "image_id": i["id"],
                "file_name": i["file_name"].replace(".jpg", ".png"),
                "segments_info": [{"id": 1, "category_id": 187, "bbox": [0, 0, 64, 20]}],
            }
            for i in images
        ],
    }
    captions = [
        {"id": 30, "image_id": 139, "caption": "A tv in a crowded room."},
        {"id": 31, "image_id": 285, "caption": "A person on a lawn."},
    ]
    dump = lambda d: json.dumps(d).encode()
    members = {
        f"val2017/{im['file_name']}": image(64, 48, (n * 60, 90, 200))
        for n, im in enumerate(images)
    }
    members |= {
        "annotations/instances_val2017.json": dump(
            {"images": images, "categories": [person, tv], "annotations": instances}
        ),
        "annotations/person_keypoints_val2017.json": dump(
            {
                "images": images,
                "categories": [{**person, "keypoints": ["nose"] * 17, "skeleton": [[16, 14]]}],
                "annotations": keypoints,
            }
        ),
        "annotations/captions_val2017.json": dump({"images": images, "annotations": captions}),
        "annotations/stuff_val2017.json": dump(
            {"images": images, "categories": STUFF_CATEGORIES, "annotations": stuff}
        ),
        "annotations/panoptic_val2017.json": dump(panoptic),
        # COCO-Stuff's pixel maps: PNGs no json names
        "annotations/stuff_val2017_pixelmaps/000000000139.png": image(64, 48, (1, 1, 1), "PNG"),
    }
    for n, a in enumerate(panoptic["annotations"]):
        members[f"annotations/panoptic_val2017/{a['file_name']}"] = image(64, 48, (n, 2, 3), "PNG")
    return members


def test_a_whole_coco_annotations_folder_gives_each_instance_box_once(lake, put_pack):
    result, rows, rejects = ingest(lake, put_pack, "coco2017", coco_annotations_folder())
    # the mask PNGs are no images: four images, each box of the instances file once
    assert {m: (r["label"], r["label_source"], r["boxes"]) for m, r in rows.items()} == {
        "val2017/000000000139.jpg": (
            "tv",  # not the crowds' person, nor the stuff's sky
            "coco",
            [
                box("tv", 40, 10, 12, 8),
                box("person", 0, 20, 30, 28, iscrowd=True),
                box("person", 30, 24, 20, 24, iscrowd=True),
            ],
        ),
        "val2017/000000000285.jpg": ("person", "coco", [box("person", 2.5, 4, 40, 40)]),
        # crowd boxes alone: the most frequent of them is the label
        "val2017/000000000632.jpg": ("person", "coco", [box("person", 8, 8, 16, 16, iscrowd=True)]),
        "val2017/000000000776.jpg": (None, None, []),  # val2017/ is no class
    }
    assert rejects == [
        ("annotations/captions_val2017.json", "COCO captions: no boxes; skipped"),
        (
            "annotations/panoptic_val2017.json",
            "COCO panoptic segmentation: skipped (its 4 mask PNG(s) are annotations, not images)",
        ),
        (
            "annotations/person_keypoints_val2017.json",
            "COCO keypoints: 4 box(es) are also in 'annotations/instances_val2017.json'; read once",
        ),
        (
            "annotations/stuff_val2017.json",
            "COCO stuff segmentation: regions, not object boxes; skipped",
        ),
        (
            "annotations/stuff_val2017_pixelmaps/",
            "1 PNG(s) under annotations/: segmentation masks, not images",
        ),
    ]
    assert (result.accepted, result.boxes) == (4, {"accepted": 5, "rejected": 0})
    assert result.labels == {"(none)": 1, "person": 2, "tv": 1}
    # through the index and the tables to SQL: iscrowd is a column of `objects`
    catalog = catalog_of(lake)
    got = catalog.query(
        "SELECT i.member, o.box, o.category, o.x, o.y, o.w, o.h, o.iscrowd, o.label "
        "FROM objects AS o JOIN images AS i ON o.sha256 = i.sha256 ORDER BY i.member, o.box"
    )
    assert [tuple(r.values()) for r in got.to_pylist()] == [
        ("val2017/000000000139.jpg", 0, "tv", 40.0, 10.0, 12.0, 8.0, False, "tv"),
        ("val2017/000000000139.jpg", 1, "person", 0.0, 20.0, 30.0, 28.0, True, "tv"),
        ("val2017/000000000139.jpg", 2, "person", 30.0, 24.0, 20.0, 24.0, True, "tv"),
        ("val2017/000000000285.jpg", 0, "person", 2.5, 4.0, 40.0, 40.0, False, "person"),
        ("val2017/000000000632.jpg", 0, "person", 8.0, 8.0, 16.0, 16.0, True, "person"),
    ]
    # a trainer leaves the crowds out as COCO's evaluation does
    crowd_free = catalog.query("SELECT count(*) AS n FROM objects WHERE NOT iscrowd")
    assert crowd_free.to_pylist() == [{"n": 2}]


def test_coco_files_are_told_by_content_not_only_by_name():
    images = [{"id": 1, "file_name": "a.jpg"}]
    stuff = {  # COCO-Stuff's categories under another name
        "images": images,
        "categories": STUFF_CATEGORIES,
        "annotations": [{"id": 1, "image_id": 1, "category_id": SKY, "bbox": [0, 0, 4, 4]}],
    }
    captions = {"images": images, "annotations": [{"id": 1, "image_id": 1, "caption": "a"}]}
    panoptic = {
        "images": images,
        "categories": [{"id": 1, "name": "person", "isthing": 1}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": []}],
    }
    for doc, kind in ((stuff, "stuff"), (captions, "captions"), (panoptic, "panoptic")):
        parsed = parse_coco(json.dumps(doc), "export/labels.json")
        assert (parsed.kind, parsed.skipped, parsed.boxes, parsed.problems) == (
            kind,
            COCO_SKIPPED[kind],
            {},
            [],
        )
    assert parse_coco(json.dumps(panoptic), "x.json").masks == ["a.png"]


def test_iscrowd_is_false_for_voc_and_yolo_and_reaches_the_subset_manifest(lake, put_pack):
    from assets.subsets import BOXES, query_manifest

    coco = {
        "images": [{"id": 1, "file_name": "crowd.jpg"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 2, 10, 20], "iscrowd": 0},
        ],
    }
    ingest(
        lake,
        put_pack,
        "coco",
        {"crowd.jpg": image(40, 30, (200, 0, 0)), "coco.json": json.dumps(coco).encode()},
    )
    voc = (
        "<annotation><filename>street.jpg</filename><object><name>car</name><bndbox>"
        "<xmin>4</xmin><ymin>6</ymin><xmax>24</xmax><ymax>16</ymax></bndbox></object></annotation>"
    )
    ingest(
        lake,
        put_pack,
        "voc",
        {
            "JPEGImages/street.jpg": image(32, 32, (0, 200, 0)),
            "Annotations/street.xml": voc.encode(),
        },
    )
    ingest(
        lake,
        put_pack,
        "yolo",
        {
            "classes.txt": b"bike\n",
            "images/bike.png": image(64, 32, (0, 0, 200), "PNG"),
            "labels/bike.txt": b"0 0.5 0.5 0.25 0.5\n",
        },
    )
    catalog = catalog_of(lake)
    got = catalog.query(
        "SELECT category, x, y, w, h, iscrowd, label FROM objects ORDER BY category, x"
    ).to_pylist()
    assert [tuple(r.values()) for r in got] == [
        ("bike", 24.0, 8.0, 16.0, 16.0, False, "bike"),
        ("car", 4.0, 6.0, 20.0, 10.0, False, "car"),
        ("person", 1.0, 2.0, 10.0, 20.0, True, "person"),
        ("person", 20.0, 2.0, 10.0, 20.0, False, "person"),
    ]
    # a frozen subset's `objects` column carries each box's iscrowd
    manifest = query_manifest(catalog, "SELECT sha256 FROM images")
    assert sorted(
        (b["category"], b["x"], b["iscrowd"])
        for boxes in manifest[BOXES].to_pylist()
        for b in boxes
    ) == [
        ("bike", 24.0, False),
        ("car", 4.0, False),
        ("person", 1.0, True),
        ("person", 20.0, False),
    ]


def yolo_line(cls: int, cx: float, cy: float, w: float, h: float) -> str:
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def test_cvat_yolo_1_1_darknet_layout(lake, put_pack):
    a, b = image(100, 80, (10, 20, 30)), image(100, 80, (30, 20, 10))
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "cvat_yolo",
        {
            "obj.names": b"cat\ndog\n",
            "obj.data": b"classes = 2\ntrain = data/train.txt\nnames = data/obj.names\nbackup = backup/\n",
            "train.txt": b"data/obj_train_data/a.jpg\ndata/obj_train_data/b.jpg\ndata/obj_train_data/gone.jpg\n",
            "obj_train_data/a.jpg": a,
            "obj_train_data/a.txt": "\n".join(
                [
                    yolo_line(0, 0.25, 0.5, 0.5, 0.25),
                    yolo_line(1, 0.75, 0.75, 0.25, 0.5),
                    yolo_line(1, 0.5, 0.5, 0.5, 0.5),
                ]
            ).encode(),
            "obj_train_data/b.jpg": b,
            "obj_train_data/b.txt": b"",  # CVAT writes an empty file for an image without objects
        },
    )
    assert {m: (r["label"], r["label_source"], r["boxes"]) for m, r in rows.items()} == {
        "obj_train_data/a.jpg": (
            "dog",
            "yolo",
            [box("cat", 0, 30, 50, 20), box("dog", 62.5, 40, 25, 40), box("dog", 25, 20, 50, 40)],
        ),
        "obj_train_data/b.jpg": (None, None, []),  # obj_train_data/ is no class
    }
    assert rejects == [
        (
            "train.txt",
            "1 of its 3 image path(s) name no image in the pack, e.g. 'data/obj_train_data/gone.jpg'",
        )
    ]
    assert result.boxes == {"accepted": 3, "rejected": 0}
    # obj.data's class count is checked against the names it points at
    _, _, rejects = ingest(
        lake,
        put_pack,
        "three_classes",
        {
            "obj.names": b"cat\ndog\n",
            "obj.data": b"classes = 3\nnames = data/obj.names\n",
            "obj_train_data/a.jpg": a,
            "obj_train_data/a.txt": yolo_line(0, 0.5, 0.5, 0.5, 0.5).encode(),
        },
    )
    assert rejects == [("obj.data", "classes = 3, but 'obj.names' names 2")]
    # labels with no names file: the reason says so, not "not an image"
    _, rows, rejects = ingest(
        lake,
        put_pack,
        "no_names",
        {
            "obj.data": b"classes = 2\nnames = data/obj.names\n",
            "obj_train_data/a.jpg": a,
            "obj_train_data/a.txt": yolo_line(0, 0.5, 0.5, 0.5, 0.5).encode(),
        },
    )
    assert rows["obj_train_data/a.jpg"]["boxes"] == []
    assert rejects == [
        (
            "obj.data",
            "Darknet config: its names file 'data/obj.names' is not in the pack; its labels are not read",
        ),
        (
            "obj_train_data/a.txt",
            "YOLO labels, but no class names in the pack (data.yaml, classes.txt or obj.names)",
        ),
    ]


def voc_xml(filename: str, objects: list[tuple]) -> bytes:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1 in objects
    )
    return f"<annotation><filename>{filename}</filename>{objs}</annotation>".encode()


def test_voc_xml_naming_another_file_is_paired_with_the_image_of_its_stem(lake, put_pack):
    shot = lambda n: image(50, 40, (n * 40, 10, 10))
    result, rows, rejects = ingest(
        lake,
        put_pack,
        "voc_stems",
        {
            # renamed after labelling: the image beside the xml, by its stem
            "data/b.jpg": shot(1),
            "data/b.xml": voc_xml("renamed.jpg", [("cat", 1, 2, 11, 22)]),
            "pics/b.jpg": shot(2),  # another b: the one beside the xml is taken
            # converted to png: JPEGImages/ beside the Annotations/ folder
            "VOC/Annotations/c.xml": voc_xml("c.jpg", [("dog", 5, 5, 25, 15)]),
            "VOC/JPEGImages/c.png": image(50, 40, (9, 9, 9), "PNG"),
            "VOC/SegmentationClass/c.png": image(50, 40, (0, 0, 0), "PNG"),  # a mask, no image
            # a camera name: the one image of the pack with the xml's stem
            "ann/d.xml": voc_xml("IMG_0001.JPG", [("cup", 0, 0, 50, 40)]),
            "photos/d.jpg": shot(3),
            # no image of its stem: its boxes are dropped
            "ann/e.xml": voc_xml("e.jpg", [("cat", 0, 0, 5, 5)]),
        },
    )
    assert {m: (r["label"], r["boxes"]) for m, r in rows.items()} == {
        "data/b.jpg": ("cat", [box("cat", 1, 2, 10, 20)]),
        "pics/b.jpg": ("pics", []),
        "VOC/JPEGImages/c.png": ("dog", [box("dog", 5, 5, 20, 10)]),
        "photos/d.jpg": ("cup", [box("cup", 0, 0, 50, 40)]),
    }
    assert rejects == [
        (
            "VOC/Annotations/c.xml",
            "<filename> 'c.jpg' is not in the pack; paired with 'VOC/JPEGImages/c.png' by its stem",
        ),
        (
            "VOC/SegmentationClass/",
            "1 PNG(s) under SegmentationClass/: segmentation masks, not images",
        ),
        (
            "ann/d.xml",
            "<filename> 'IMG_0001.JPG' is not in the pack; paired with 'photos/d.jpg' by its stem",
        ),
        ("ann/e.xml", "image 'e.jpg' is not in the pack: its 1 box(es) dropped"),
        (
            "data/b.xml",
            "<filename> 'renamed.jpg' is not in the pack; paired with 'data/b.jpg' by its stem",
        ),
    ]
    assert result.boxes == {"accepted": 3, "rejected": 1}


def _without_iscrowd(table: pa.Table) -> pa.Table:
    """``table`` (an index, manifest or objects part) as written before iscrowd existed."""
    if "iscrowd" in table.schema.names:
        return table.drop_columns(["iscrowd"])
    if "boxes" not in table.schema.names or not pa.types.is_list(table.schema.field("boxes").type):
        return table  # images: its boxes is a count
    old_box = pa.struct([f for f in BOX_TYPE if f.name != "iscrowd"])
    rows = [
        {**r, "boxes": [{k: v for k, v in b.items() if k != "iscrowd"} for b in r["boxes"] or []]}
        for r in table.to_pylist()
    ]
    at = table.schema.get_field_index("boxes")
    return pa.Table.from_pylist(
        rows, schema=table.schema.set(at, pa.field("boxes", pa.list_(old_box)))
    )


def _as_written_before_iscrowd(lake, *roots: str) -> None:
    for root in roots:
        for key in lake.keys(root):
            if key.endswith(".parquet"):
                write_parquet(lake, key, _without_iscrowd(read_parquet(lake, key)))


def catalog_keys(lake, table: str) -> list[str]:
    return [k for k in lake.keys(f"tables/{table}/") if k.endswith(".parquet")]


def one_box_pack(lake, put_pack, name: str, iscrowd: int) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": iscrowd}
        ],
    }
    members = {"a.jpg": image(40, 30, (5, 6, 7)), "a.json": json.dumps(coco).encode()}
    ingest(lake, put_pack, name, members)


def test_a_lake_written_before_iscrowd_reads_as_no_crowd_and_is_rebuilt_once(lake, put_pack):
    one_box_pack(lake, put_pack, "old", iscrowd=0)
    catalog = catalog_of(lake)
    (prefix,) = {
        k[len("index/raw/") : -len(".parquet")]
        for k in lake.keys("index/raw/")
        if k.endswith(".parquet")
    }
    # every file as a lake written before this change has it, the tables' state without a version
    _as_written_before_iscrowd(lake, "packs/old/", "index/raw/", "tables/")
    state = json.loads(lake.get(tables_state_key(prefix)))
    del state["rows_version"]
    lake.put(tables_state_key(prefix), json.dumps(state).encode())
    # read as they are: no crowd was marked then
    query = "SELECT category, x, iscrowd FROM objects"
    assert catalog.query(query).to_pylist() == [{"category": "person", "x": 1.0, "iscrowd": False}]
    assert [r["iscrowd"] for r in read_prefix_table(lake, "objects", prefix).to_pylist()] == [False]
    assert read_index(lake, prefix).schema != INDEX_SCHEMA  # not cast: its iscrowd would be null
    # the next merge rebuilds the index once and tells the table step every row changed
    stats, told, new, gone = merge_prefix(lake, prefix, {})
    index = read_index(lake, prefix)
    assert index.schema == INDEX_SCHEMA
    assert (told, new, gone) == (index["sha256"].to_pylist(), [], [])
    assert index.to_pylist() == rebuild_raw_index(lake, [prefix])[prefix].to_pylist()
    assert index["boxes"].to_pylist() == [[box("person", 1, 2, 10, 20)]]
    # the tables, whose state names no rows version, are rebuilt from it when next written
    write_prefix_tables(lake, prefix, ImageParams(ResizeParams(size=16), EdgeParams()))
    assert json.loads(lake.get(tables_state_key(prefix)))["rows_version"] == ROWS_VERSION
    assert read_parquet(lake, catalog_keys(lake, "objects")[0]).schema.names == OBJECTS_SCHEMA.names
    assert catalog.query(query).to_pylist() == [{"category": "person", "x": 1.0, "iscrowd": False}]


def test_duckdb_over_pyarrow_datasets_reads_a_missing_iscrowd_as_false(lake, put_pack, monkeypatch):
    """The object store's path (pyarrow datasets, not DuckDB's own reader): the same columns."""
    import resources.catalog

    monkeypatch.setattr(resources.catalog, "_parquet_view", lambda *args: False)
    one_box_pack(lake, put_pack, "crowd", iscrowd=1)
    catalog = catalog_of(lake)
    query = "SELECT category, iscrowd FROM objects"
    assert catalog.query(query).to_pylist() == [{"category": "person", "iscrowd": True}]
    _as_written_before_iscrowd(lake, "tables/")
    assert catalog.query(query).to_pylist() == [{"category": "person", "iscrowd": False}]
    described = catalog.query("SELECT column_name FROM (DESCRIBE objects)")["column_name"]
    assert described.to_pylist() == [*OBJECTS_SCHEMA.names, "prefix"]
