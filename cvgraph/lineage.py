"""Lineage of a model (and its exports) or a subset, from the lake's records and Dagster's events."""

from __future__ import annotations

import json

import dagster as dg


def _json(lake, key: str) -> dict | None:
    return json.loads(lake.get(key)) if lake.exists(key) else None


def _dagster(inst: dg.DagsterInstance, asset: str, partition: str) -> dict | None:
    """The latest materialisation of ``asset[partition]`` on the instance (run id, data version)."""
    records = inst.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None
    ev = records[0].event_log_entry
    mat = ev.asset_materialization
    return {
        "run_id": ev.run_id,
        "data_version": (mat.tags or {}).get("dagster/data_version"),
        "timestamp": ev.timestamp,
    }


def lineage_of(lake, inst: dg.DagsterInstance, key: str) -> dict:
    """The lineage tree of a model (with its exports) or a subset ``key``; KeyError if neither."""
    from workloads.layout import (
        evaluation_keys,
        evaluations,
        export_keys,
        model_keys,
        pack_keys,
        subset_keys,
    )
    from workloads.training.spec import evaluation_score, test_score

    tree: dict = {}
    model = _json(lake, model_keys(key)["record"])
    subset_key = key
    if model:
        exports = _json(lake, export_keys(key)["record"])
        if exports:
            tree["export"] = {
                "key": key,
                "formats": exports["formats"],
                "model_sha256": exports["model_sha256"],
                "model_version": exports.get("model_version", ""),
                # made from another training of the key than the one it holds now
                "stale": exports["model_sha256"] != model["model_sha256"],
                "dagster": _dagster(inst, "exported_models", key),
            }
        tree["model"] = {
            k: model[k]
            for k in (
                "key",
                "model_sha256",
                "test_accuracy",
                "test_map",
                "test_map50",
                "mlflow_run_id",
                "training_job",
                "spec",
                "counts",
            )
            if k in model
        }
        tree["model"]["score"] = test_score(model)
        tree["model"]["version"] = model.get("mlflow_model_version", "")
        if "sweep" in model:  # every trial of the sweep it was kept from
            sw = model["sweep"]
            tree["model"]["sweep"] = {
                "name": sw["name"],
                "objective": sw["objective"],
                "best": sw["best"],
                "mlflow_run_id": sw["mlflow_run_id"],
                "trials": [
                    {
                        k: t[k]
                        for k in ("number", "params", "objective", "mlflow_run_id", "model_sha256")
                    }
                    for t in sw["trials"]
                ],
            }
        tree["model"]["dagster"] = _dagster(inst, "trained_models", key)
        tree["evaluations"] = []
        for _, on in evaluations(lake, key):
            ev = _json(lake, evaluation_keys(key, on)["record"]) or {}
            tree["evaluations"].append(
                {
                    "subset": on,
                    "model_version": ev.get("model_version", ""),
                    "accuracy": ev.get("scores", {}).get("accuracy"),
                    "score": evaluation_score(ev),
                    # scored another training of the key than the one it holds now
                    "stale": ev.get("model_sha256") != model["model_sha256"],
                }
            )
        subset_key = model["subset"]
    subset = _json(lake, subset_keys(subset_key)["record"])
    if subset is None:
        raise KeyError(f"{key!r} is neither a trained model nor a frozen subset")
    tree["subset"] = {
        k: subset[k]
        for k in ("key", "sql", "rows", "manifest_sha256", "input_merkle_root", "labels", "splits")
    }
    tree["subset"]["dagster"] = _dagster(inst, "frozen_subsets", subset_key)
    tree["prefixes"] = subset["prefix_versions"]
    tree["packs"] = []
    for pack_id in subset.get("packs", []):
        rec = _json(lake, pack_keys(pack_id)["record"]) or {}
        tree["packs"].append(
            {
                "pack_id": pack_id,
                "zip_sha256": rec.get("zip_sha256"),
                "accepted": rec.get("accepted"),
                "duplicates": rec.get("duplicates"),
                "rejected": len(rec.get("rejected", [])),
            }
        )
    return tree


def render(tree: dict, prefixes: bool = False) -> str:
    """The tree as text: export → model → subset → packs → prefix partitions (one line, or with
    ``prefixes`` a line per prefix with each asset's data version)."""
    out: list[str] = []
    indent = 0
    if "export" in tree:
        e = tree["export"]
        version = f" v{e['model_version']}" if e.get("model_version") else ""
        out.append(f"export {e['key']}  (model{version} {e['model_sha256'][:12]})")
        if e.get("stale"):
            out.append(
                f"  STALE: made from an older training of {e['key']} than the model below; "
                f"`cvgraph export {e['key']}` makes them again"
            )
        for fmt, r in e["formats"].items():
            out.append(
                f"  {fmt:12s} {r['key']}  sha256 {r['sha256'][:12]}  max |Δlogit| {r['max_abs_error']:.1e}  top-1 agreement {r['top1_agreement']:.3f}"
            )
        indent = 1
    if "model" in tree:
        m = tree["model"]
        p = "  " * indent
        for ev in tree.get("evaluations", []):
            version = f" v{ev['model_version']}" if ev.get("model_version") else ""
            out.append(
                f"{p}evaluation {m['key']}{version} on {ev['subset']}  {ev['score'][0]} {ev['score'][1]:.4f}"
                + (
                    f"  STALE: of an older training; `cvgraph evaluate {m['key']} {ev['subset']}` scores this one"
                    if ev["stale"]
                    else ""
                )
            )
        out.append(
            f"{p}└─ model {m['key']}{' v' + m['version'] if m.get('version') else ''}  sha256 {m['model_sha256'][:12]}  {m['score'][0]} {m['score'][1]:.4f}  mlflow run {m['mlflow_run_id']}  job {m['training_job']}"
        )
        if sw := m.get("sweep"):
            out.append(
                f"{p}   sweep {sw['name']}: {len(sw['trials'])} trials by {sw['objective']}, "
                f"kept trial {sw['best']} (mlflow run {sw['mlflow_run_id']})"
            )
            for t in sw["trials"]:
                value = "failed" if t["objective"] is None else f"{t['objective']:.4f}"
                params = ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in t["params"].items()
                )
                mark = "*" if t["number"] == sw["best"] else " "
                out.append(f"{p}   {mark} trial {t['number']}: {value}  {params}")
        indent += 1
    s = tree["subset"]
    p = "  " * indent
    out.append(
        f"{p}└─ subset {s['key']}  {s['rows']} rows  manifest sha256 {s['manifest_sha256'][:16]}"
    )
    out.append(f"{p}     query: {s['sql']}")
    out.append(f"{p}   └─ packs")
    for pk in tree["packs"]:
        out.append(
            f"{p}        {pk['pack_id']}  zip sha256 {str(pk['zip_sha256'])[:16]}  accepted {pk['accepted']}  duplicates {pk['duplicates']}  rejected {pk['rejected']}"
        )
    versions_of = tree["prefixes"]
    out.append(
        f"{p}   └─ {len(versions_of)} prefix partitions  (merkle root over image_tables: {s['input_merkle_root']})"
        + ("" if prefixes else "  --prefixes lists them")
    )
    if prefixes:
        for pp, versions in sorted(versions_of.items()):
            out.append(
                f"{p}        {pp}  " + "  ".join(f"{a}={v[:10]}" for a, v in versions.items())
            )
    return "\n".join(out)
