import dagster as dg

from orchestration.definitions import defs
from partitions import hash_prefixes

ASSETS = {
    "raw_packs",
    "raw_images",
    "resized_images",
    "edge_maps",
    "image_tables",
    "frozen_subsets",
    "trained_models",
    "exported_models",
}
PREFIX_ASSETS = {"raw_images", "resized_images", "edge_maps", "image_tables"}


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_all_eight_assets_with_code_versions_and_partitions():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version, key
        if key.to_user_string() in PREFIX_ASSETS:
            assert node.partitions_def == hash_prefixes
            assert node.backfill_policy == dg.BackfillPolicy.single_run()
            assert node.automation_condition is not None


def test_sensors_and_checks_are_registered():
    assert {s.name for s in defs.sensors} == {"incoming_packs", "image_automation"}
    checks = {
        (k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys
    }
    assert {
        ("resized_images", "complete"),
        ("edge_maps", "complete"),
        ("image_tables", "rows_match_images"),
        ("exported_models", "parity"),
        ("frozen_subsets", "manifest_intact"),
        ("raw_packs", "manifest_matches_record"),
    } <= checks


def test_lineage_edges():
    graph = defs.resolve_asset_graph()
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
        for k in graph.get_all_asset_keys()
    }
    assert parents["raw_images"] == {"raw_packs"}
    assert parents["edge_maps"] == {"resized_images"}
    assert parents["image_tables"] == {"raw_images", "resized_images", "edge_maps"}
    assert parents["frozen_subsets"] == {"image_tables"}
    assert parents["exported_models"] == {"trained_models"}
