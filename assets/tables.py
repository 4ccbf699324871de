"""image_tables: the Athena/DuckDB tables ``images`` and ``objects``, one file per prefix."""


import json

import dagster as dg

from assets.images import EDGES, RESIZED, prefix_automation, raw_images, single_run
from assets.versioning import record_prefixes, version_key
from partitions import hash_prefixes
from resources.catalog import Catalog
from resources.settings import ImageSettings
from resources.storage import LakeResource
from resources.tables import TableWriter


@dg.asset(
    partitions_def=hash_prefixes,
    deps=[raw_images, RESIZED, EDGES],
    backfill_policy=single_run,
    automation_condition=prefix_automation,
    code_version="1",
    group_name="tables",
    kinds={"parquet", "athena"},
    description="Rows of `images` (one per image) and `objects` (one per annotated box) under tables/<table>/prefix=<pp>/.",
    check_specs=[dg.AssetCheckSpec("rows_match_images", asset="image_tables", description="`images` rows = indexed originals, every row has its resized and edge map")],
)
def image_tables(context: dg.AssetExecutionContext, lake: LakeResource, image_settings: ImageSettings, catalog: Catalog, table_writer: TableWriter):
    store = lake.lake()
    params = image_settings.params()
    stats = table_writer.write(store, list(context.partition_keys), params)
    catalog.register_tables()
    yield record_prefixes(context, store, context.asset_key, stats, ("images", "objects", "missing_variants"))
    bad = {}
    for p, s in stats.items():
        raw = json.loads(store.get(version_key("raw_images", p)))["images"] if store.exists(version_key("raw_images", p)) else 0
        if s["images"] != raw or s["missing_variants"]:
            bad[p] = {"rows": s["images"], "raw": raw, "missing_variants": s["missing_variants"]}
    yield dg.AssetCheckResult(
        check_name="rows_match_images",
        passed=not bad,
        metadata={"prefixes": len(stats), "rows": sum(s["images"] for s in stats.values()), "mismatched": json.dumps(dict(list(bad.items())[:20]))},
    )
