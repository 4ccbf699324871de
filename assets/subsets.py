"""frozen_subsets: an immutable manifest made by one read-only SQL query over the tables.

Zero-copy: the manifest lists lake keys of originals and variants; nothing is copied.
Immutable: once frozen, a key always returns the same manifest (re-materialising verifies
it); a different query under the same key is refused.
"""

import contextlib
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assets.keys import require_key
from assets.owed import owed
from assets.tables import image_tables
from assets.versioning import lake_merkle_root, md_table, picture, read_prefix_versions
from partitions import subset_partitions_def
from resources.catalog import Catalog, QueryError, ensure_select, normalised_sql
from resources.settings import ImageSettings
from resources.storage import LakeResource
from workloads.annotations import BOX_TYPE
from workloads.lake import parquet_table, write_parquet
from workloads.layout import pending_packs, subset_keys
from workloads.tasks import on_forks
from workloads.versions import sha256_hex, table_hash

REQUIRED = (
    "sha256",
    "prefix",
    "pack_id",
    "label",
    "split",
    "original_key",
    "resized_key",
    "edges_key",
    "resized_sha256",
    "edges_sha256",
    "width",  # the original's size: what a detection target is mapped from
    "height",
)
BOXES = "objects"  # the manifest's column of each image's boxes (from the `objects` table)
PREFIX_ASSETS = ("raw_images", "resized_images", "edge_maps", "image_tables")


class FreezeConfig(dg.Config):
    sql: str = ""  # empty: re-verify an existing subset
    # A lake with work owed (zips to ingest, prefixes whose stages lag) is refused unless this is
    # set; then subset.json records what was owed ("pending").
    allow_pending: bool = False


def query_manifest(catalog: Catalog, sql: str):
    """Run the freeze query and sort by sha256. The lake keys and hashes always come from
    `images` (joined on sha256), never from the query, so a subset cannot point outside the lake."""
    sql = ensure_select(sql)
    inner = f"(\n{sql}\n) AS q"  # newlines: a trailing -- comment cannot swallow the wrapper
    cols = catalog.query(f"SELECT * FROM {inner} LIMIT 0").schema.names
    if "sha256" not in cols:
        raise dg.Failure(
            description="a freeze query must return a `sha256` column (e.g. SELECT * FROM images WHERE ...)"
        )
    own = [f'q."{c}"' for c in cols if c not in (*REQUIRED, BOXES)]
    select = ", ".join([*(f"i.{c}" for c in REQUIRED), *own])
    manifest = catalog.query(
        f"SELECT {select} FROM {inner} JOIN images AS i ON q.sha256 = i.sha256 ORDER BY i.sha256"
    )
    boxes = catalog.query(
        "SELECT o.sha256, o.box, o.category, o.x, o.y, o.w, o.h, o.iscrowd FROM objects AS o "
        f"WHERE o.sha256 IN (SELECT q.sha256 FROM {inner})"
    )
    return manifest.append_column(BOXES, _boxes_of(manifest["sha256"], boxes))


def _boxes_of(shas, objects: pa.Table) -> pa.Array:
    """Each image's boxes (``objects`` rows, in box order, ``iscrowd`` with them) as a list column
    aligned to ``shas``. Built from offsets in numpy: filling 1M null lists with an empty one took
    pyarrow 2.4 s."""
    objects = objects.sort_by([("sha256", "ascending"), ("box", "ascending")])
    fields = [objects[f].combine_chunks().cast(BOX_TYPE.field(f).type) for f in BOX_TYPE.names]
    # Athena reads a part written before objects had iscrowd as null: no crowd was marked then
    crowd = BOX_TYPE.get_field_index("iscrowd")
    fields[crowd] = pc.fill_null(fields[crowd], False)
    boxes = pa.StructArray.from_arrays(fields, fields=list(BOX_TYPE))
    # sorted by image: one run of rows per sha256, the runs in sha256 order
    counts = pc.value_counts(objects["sha256"])
    runs = pc.take(counts, pc.sort_indices(counts.field("values"))).flatten()
    # per run: (first row, rows); an image without boxes points at the empty run appended last
    lengths = np.append(runs[1].to_numpy(), 0)
    starts = np.cumsum(lengths) - lengths
    run_of = pc.fill_null(pc.index_in(shas, value_set=runs[0]), len(lengths) - 1).to_numpy()
    lengths, starts = lengths[run_of], starts[run_of]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # row i's boxes are rows starts[i]..starts[i]+lengths[i] of `boxes`: one gather for all
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), boxes.take(pa.array(gather)), type=pa.list_(BOX_TYPE)
    )


def _packs_of(manifest) -> list[str]:
    """Every pack that contributed an image of the subset (an image may come from several)."""
    col = (
        pc.list_flatten(manifest["packs"])
        if "packs" in manifest.schema.names
        else manifest["pack_id"]
    )
    return sorted(v for v in pc.unique(col).to_pylist() if v is not None)


def _box_counts(manifest) -> tuple[dict[str, int], int]:
    """(boxes per category, images with no box) of a manifest."""
    boxes = manifest[BOXES]
    categories = pc.struct_field(pc.list_flatten(boxes), "category")
    return _counts(categories) if len(categories) else {}, pc.sum(
        pc.equal(pc.fill_null(pc.list_value_length(boxes), 0), 0)
    ).as_py() or 0


def _counts(column) -> dict[str, int]:
    return dict(
        sorted((str(r["values"]), r["counts"]) for r in pc.value_counts(column).to_pylist())
    )


def _verified_manifest(lake, key: str, record: dict):
    """The subset's manifest, after checking it still hashes to what was frozen: the object's
    bytes (or, for subsets frozen before manifests were hashed as objects, its rows)."""
    data = lake.get(subset_keys(key)["manifest"])
    actual = (
        sha256_hex(data)
        if record.get("manifest_hash_of") == "object"
        else table_hash(parquet_table(data))
    )
    if actual != record["manifest_sha256"]:
        raise ValueError(
            f"subset {key}: manifest was changed after freezing (hash {actual[:12]} != frozen {record['manifest_sha256'][:12]})"
        )
    return parquet_table(data)


def load_subset(lake, key: str):
    """``(record, manifest)``, after checking the manifest still hashes to what was frozen."""
    record = json.loads(lake.get(subset_keys(key)["record"]))
    return record, _verified_manifest(lake, key, record)


def verify_subset(lake, key: str) -> dict:
    """The subset record, after checking the manifest still hashes to what was frozen."""
    return load_subset(lake, key)[0]


def balance_score(labels: dict[str, int]) -> float:
    """How evenly the labelled images spread over their labels: the Shannon entropy of the label
    distribution over its maximum, ln(number of labels). 1: every label has as many images; 0:
    one label (or none). Unlabelled images ("None") are counted apart, not as a label."""
    counts = [n for label, n in labels.items() if label != "None" and n > 0]
    if len(counts) < 2:
        return 0.0
    total = sum(counts)
    entropy = -sum(n / total * math.log(n / total) for n in counts)
    return round(entropy / math.log(len(counts)), 6)


def _metadata(record: dict, label_png: bytes | None) -> dict:
    labels = record["labels"]
    return {
        "rows": record["rows"],
        "manifest_sha256": record["manifest_sha256"],
        "sql": dg.MetadataValue.md(f"```sql\n{record['sql']}\n```"),
        "input_merkle_root": record["input_merkle_root"],
        "prefixes": len(record["prefix_versions"]),
        "splits": dg.MetadataValue.json(record["splits"]),
        "labels": dg.MetadataValue.md(
            md_table([{"label": k, "rows": v} for k, v in labels.items()], ["label", "rows"])
        ),
        "label_balance_png": record.get("label_plot", ""),
        **({"label_balance": picture("label balance", label_png)} if label_png else {}),
        "balance_score": record.get("balance", {}).get("score", balance_score(labels)),
        "unlabelled_images": labels.get("None", 0),
        "boxes": dg.MetadataValue.md(
            md_table(
                [{"category": k, "boxes": v} for k, v in record.get("boxes", {}).items()],
                ["category", "boxes"],
            )
        ),
        "images_without_boxes": record.get("images_without_boxes", 0),
    }


def _label_png(store, record: dict) -> bytes | None:
    try:
        return store.get(record["label_plot"]) if record.get("label_plot") else None
    except FileNotFoundError:
        return None


def _plot_labels(lake, key: str, labels: dict[str, int]) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(labels)), 3))
    ax.bar(list(labels), list(labels.values()), color="#4f6bed")
    ax.set_title(f"label balance: {key}")
    ax.set_ylabel("images")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    out = subset_keys(key)["labels"]
    lake.put(out, buf.getvalue())
    return out


def _claim(store, key: str, sql: str) -> bool:
    """Claim ``key`` for ``sql`` with a conditional create (S3 If-None-Match; a lock and a rename
    locally); True if this freeze made the claim. A freeze racing another of the same key with
    the same query goes on (both write the same bytes); with another query it is refused before
    it writes anything, so no reader can pair one query's manifest with the other's record."""
    keys = subset_keys(key)
    mine = normalised_sql(sql)
    if store.put_if_match(keys["claim"], json.dumps({"sql": mine}).encode(), None):
        return True
    held, _ = store.get_tagged(keys["claim"])
    theirs = json.loads(held)["sql"] if held else mine
    if theirs != mine:
        raise dg.Failure(
            description=f"subset {key} is being frozen with a different query ({theirs!r}): "
            f"freeze under a new key (a killed freeze's claim: `cvgraph forget subset {key}`)"
        )
    return False


def rows_read_twice(catalog: Catalog, manifest) -> dict[str, int]:
    """``{sha256: rows}`` of the manifest's images that the ``images`` table itself reads more
    than once. It holds one row per image; Athena reads every object under ``prefix=<pp>/``, so
    between a table commit and its clean-up a replaced row is read twice (DuckDB reads only the
    parts the commit states name: never). One grouped query, only when the manifest repeats an
    image (a query's own join may repeat one too: that is not this)."""
    sha = manifest["sha256"]  # sorted (query_manifest): a repeated image's rows are adjacent
    after = sha.slice(1)
    repeated = pc.unique(pc.filter(after, pc.equal(after, sha.slice(0, len(after))))).to_pylist()
    if not repeated:
        return {}
    listed = ", ".join(f"'{s}'" for s in repeated if re.fullmatch(r"[0-9a-f]{64}", s))
    twice = catalog.query(
        f"SELECT sha256, count(*) AS n FROM images WHERE sha256 IN ({listed}) "
        "GROUP BY sha256 HAVING count(*) > 1"
    )
    return dict(zip(twice["sha256"].to_pylist(), twice["n"].to_pylist()))


# A freeze that finds the images table mid-commit asks again after these waits (s).
RECHECK_S = (1.0, 3.0, 6.0)


def query_subset(
    context, store, catalog: Catalog, *, key: str, sql: str, params, allow_pending: bool
) -> tuple[object, dict | None]:
    """The manifest ``sql`` gives, checked (no work owed unless ``allow_pending``, no image read
    twice, not empty), and what was owed: (manifest, pending or None). Writes nothing."""
    owes = owed(store, params)
    if owes and not allow_pending:
        raise dg.Failure(
            description=f"subset {key}: the lake has work owed ({owes.summary()}); nothing was "
            "frozen: `cvgraph sync` finishes it (or freeze anyway with --allow-pending, which "
            "records what was owed)"
        )
    try:
        manifest = query_manifest(catalog, sql)
        twice = rows_read_twice(catalog, manifest)
        for wait in RECHECK_S if twice else ():  # a commit seen halfway is over in moments
            context.log.warning(
                f"{len(twice)} image(s) read twice (a table commit halfway); again in {wait:g} s"
            )
            time.sleep(wait)
            manifest = query_manifest(catalog, sql)
            twice = rows_read_twice(catalog, manifest)
            if not twice:
                break
    except QueryError as e:  # the user's SQL: its one line, not a traceback
        raise dg.Failure(description=f"subset {key}: {e}") from None
    if twice:
        prefixes = sorted({s[:2] for s in twice})
        raise dg.Failure(
            description=f"subset {key}: the images table reads {len(twice)} image(s) twice "
            f"(prefix(es) {', '.join(prefixes[:10])}): a table commit is between its write and its "
            "clean-up; nothing was frozen: freeze again (if it stays, `cvgraph sync` finishes it)"
        )
    if manifest.num_rows == 0:
        waiting = pending_packs(store)
        raise dg.Failure(
            description=f"subset {key}: the query matched no images; nothing was frozen"
            + (
                f" ({len(waiting)} ingested pack(s) are not queryable until `cvgraph sync`: {', '.join(sorted(waiting)[:5])})"
                if waiting
                else ""
            )
        )
    return manifest, owes.to_json() if owes else None


def write_subset(
    context, store, *, key: str, sql: str, params, manifest, pending: dict | None
) -> dict:
    """Claim ``key`` for ``sql``, then write ``manifest`` and the record; returns the record. A
    failed write leaves the key free."""
    ours = _claim(store, key, sql)
    try:
        return _write_subset(context, store, key, sql, params, manifest, pending=pending)
    except BaseException:
        if ours:  # a failed freeze leaves the key free
            store.delete(subset_keys(key)["claim"])
        raise


def _write_subset(
    context, store, key: str, sql: str, params, manifest, pending: dict | None = None
) -> dict:
    keys = subset_keys(key)
    root, _ = lake_merkle_root(store, "image_tables")
    versions = {a: read_prefix_versions(store, a) for a in PREFIX_ASSETS}
    prefixes = sorted(pc.unique(manifest["prefix"]).to_pylist())
    labels = _counts(manifest["label"])
    boxes, unboxed = _box_counts(manifest)
    # lz4: manifests are written once and read by every dataset and check (zstd reads 2-3x slower)
    data = write_parquet(store, keys["manifest"], manifest, compression="lz4")
    record = {
        "key": key,
        "sql": ensure_select(sql),
        "rows": manifest.num_rows,
        "manifest_sha256": sha256_hex(data),
        "manifest_hash_of": "object",
        "labels": labels,
        "boxes": boxes,
        "images_without_boxes": unboxed,
        "balance": {
            "score": balance_score(labels),
            "labelled": sum(n for k, n in labels.items() if k != "None"),
            "unlabelled": labels.get("None", 0),
        },
        "splits": _counts(manifest["split"]),
        "input_merkle_root": root,
        "prefix_versions": {
            p: {a: versions[a].get(p, "missing") for a in PREFIX_ASSETS} for p in prefixes
        },
        "packs": _packs_of(manifest),
        "params": {"resize": params.resize_id, "edges": params.edges_id},
        "dagster_run_id": context.run.run_id,
    }
    if pending:  # frozen with --allow-pending while the lake was owed this
        record["pending"] = pending
        context.log.warning(f"froze {key} while work was owed: {pending}")
    record["label_plot"] = _plot_labels(store, key, labels)
    store.put(keys["record"], json.dumps(record, indent=2, sort_keys=True).encode())
    context.log.info(f"froze {key}: {record['rows']} rows over {len(prefixes)} prefixes")
    return record


@dg.asset(
    partitions_def=subset_partitions_def,
    deps=[dg.AssetDep(image_tables, partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
    group_name="datasets",
    kinds={"sql", "parquet"},
    description="An immutable, zero-copy manifest made by one read-only SQL query over `images`/`objects`.",
    check_specs=[
        dg.AssetCheckSpec(
            "manifest_intact",
            asset="frozen_subsets",
            description="the manifest hashes to the frozen hash and every listed variant exists",
        )
    ],
)
def frozen_subsets(
    context: dg.AssetExecutionContext,
    config: FreezeConfig,
    lake: LakeResource,
    catalog: Catalog,
    image_settings: ImageSettings,
):
    key = require_key("subset", context.partition_key)
    store = lake.lake()
    keys = subset_keys(key)
    with variants_listed_beside(store) as list_variants:  # the check's, beside the write
        if store.exists(keys["record"]):
            record = json.loads(store.get(keys["record"]))
            if config.sql and normalised_sql(config.sql) != normalised_sql(record["sql"]):
                raise dg.Failure(
                    description=f"subset {key} is frozen with a different query ({record['sql']!r}): freeze under a new key"
                )
            manifest = _verified_manifest(store, key, record)  # read once: verified, then checked
            missing = list_variants(manifest)
            context.log.info(f"subset {key} already frozen ({record['rows']} rows); verified")
        else:
            if not config.sql:
                raise dg.Failure(
                    description=f"subset {key} does not exist yet: give the freeze query as config `sql`"
                )
            manifest, pending = query_subset(
                context,
                store,
                catalog,
                key=key,
                sql=config.sql,
                params=image_settings.params(),
                allow_pending=config.allow_pending,
            )
            missing = list_variants(manifest)
            record = write_subset(
                context,
                store,
                key=key,
                sql=config.sql,
                params=image_settings.params(),
                manifest=manifest,
                pending=pending,
            )
        yield dg.MaterializeResult(
            metadata=_metadata(record, _label_png(store, record)),
            data_version=dg.DataVersion(record["manifest_sha256"][:24]),
        )
        count, first = missing.result()  # the manifest in memory: no second read
    yield dg.AssetCheckResult(
        check_name="manifest_intact",
        passed=not count,
        metadata={"missing_files": count, "first_missing": str(first)},
    )


@contextlib.contextmanager
def variants_listed_beside(store):
    """``list_variants(manifest)`` → a future of ``_missing_variants(store, manifest)``, listed
    in a thread of its own while the caller goes on (writes the manifest). Left on an exception
    (a refused claim, a failed write, a run terminated), the listing stops at its next directory
    instead of being waited for to the end."""
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        try:
            yield lambda manifest: pool.submit(_missing_variants, store, manifest, stop)
        except BaseException:
            stop.set()
            raise


def _missing_variants(
    store, manifest, stop: threading.Event | None = None
) -> tuple[int, list[str]]:
    """How many listed resized/edges keys have no object (or no key at all), and the first few:
    one listing per variant directory instead of one request per file (the lake's
    ``list_threads`` directories at a time: on S3 each is a request or more), compared in
    Arrow. By ``names`` (one directory, no sort): about 1 µs a file here, half what ``keys``
    costs."""
    count, first = 0, []
    for col in ("resized_key", "edges_key"):
        keys = manifest[col]
        dirs = [
            d
            for d in pc.unique(
                pc.replace_substring_regex(pc.drop_null(keys), r"[^/]*$", "")
            ).to_pylist()
            if d
        ]
        listed = on_forks(
            store,
            dirs,
            lambda lake, d: [] if stop is not None and stop.is_set() else lake.names(d),
            threads=store.list_threads,
        )
        present = pa.array([d + name for d in dirs for name in listed[d]], pa.string())
        absent = pc.filter(keys, pc.invert(pc.fill_null(pc.is_in(keys, value_set=present), False)))
        count += len(absent)
        first += ["" if k is None else k for k in absent.slice(0, 5 - len(first)).to_pylist()]
    return count, first
