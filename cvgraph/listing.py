"""What exists and what was made from what, read from the lake's records: ``cvgraph ls`` (one
line per pack, subset or model) and the reverse lineage of a pack or an image (every subset that
holds it, and the models, exports and evaluations made from those)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from workloads.lake import parquet_table
from workloads.layout import evaluations, record_key, recorded, subset_keys
from workloads.training.spec import test_score

KINDS = ("packs", "subsets", "models")


def _record(lake, kind: str, key: str) -> dict:
    return json.loads(lake.get(record_key(kind, key)))


def _exports(lake, model: dict) -> str:
    """``current``, ``stale`` (of an older training) or ``none``."""
    if not lake.exists(record_key("export", model["key"])):
        return "none"
    exported = _record(lake, "export", model["key"])
    return "current" if exported["model_sha256"] == model["model_sha256"] else "stale"


def listing(lake, kind: str) -> list[dict]:
    """One summary per recorded pack, subset or model, by key."""
    if kind == "packs":
        return [
            {
                "pack_id": p,
                "accepted": (r := _record(lake, "pack", p))["accepted"],
                "duplicates": r["duplicates"],
                "rejected": len(r["rejected"]),
                "labels": len(r.get("labels", {})),
                "boxes": r.get("boxes", {}).get("accepted", 0),
            }
            for p in recorded(lake, "pack")
        ]
    if kind == "subsets":
        return [
            {
                "key": s,
                "rows": (r := _record(lake, "subset", s))["rows"],
                "balance": r.get("balance", {}).get("score"),
                "packs": r.get("packs", []),
            }
            for s in recorded(lake, "subset")
        ]
    return [
        {
            "key": m,
            "version": (r := _record(lake, "model", m)).get("mlflow_model_version", ""),
            **{k: r[k] for k in ("test_accuracy", "test_map", "test_map50") if k in r},
            "score": test_score(r),
            "subset": r["subset"],
            "exports": _exports(lake, r),
        }
        for m in recorded(lake, "model")
    ]


def render_listing(kind: str, rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if kind == "packs":
            lines.append(
                f"{r['pack_id']}  {r['accepted']} accepted  {r['duplicates']} duplicates  "
                f"{r['rejected']} rejected  {r['labels']} labels  {r['boxes']} boxes"
            )
        elif kind == "subsets":
            balance = "-" if r["balance"] is None else f"{r['balance']:.3f}"
            lines.append(
                f"{r['key']}  {r['rows']} rows  balance {balance}  packs {', '.join(r['packs'])}"
            )
        else:
            version = f" v{r['version']}" if r["version"] else ""
            lines.append(
                f"{r['key']}{version}  {r['score'][0]} {r['score'][1]:.4f}  subset "
                f"{r['subset']}  exports {r['exports']}"
            )
    return "\n".join(lines) or f"no {kind} yet"


def made_from(lake, pack: str | None = None, image: str | None = None) -> dict:
    """Every subset holding ``pack``'s images (its record's packs) or ``image`` (its manifest's
    rows), and the models trained on them and their exports."""
    subsets = []
    for s in recorded(lake, "subset"):
        if pack is not None and pack in _record(lake, "subset", s).get("packs", []):
            subsets.append(s)
        elif image is not None:
            shas = parquet_table(lake.get(subset_keys(s)["manifest"]), columns=["sha256"])
            if pc.any(pc.equal(shas["sha256"], pa.scalar(image, pa.string()))).as_py():
                subsets.append(s)
    models = [m for m in listing(lake, "models") if m["subset"] in subsets]
    trained = {m["key"] for m in models}
    return {
        **({"pack": pack} if pack is not None else {"image": image}),
        "subsets": subsets,
        "models": [m["key"] for m in models],
        "exports": [m["key"] for m in models if m["exports"] != "none"],
        # a model trained on them, or any model scored on them
        "evaluations": [
            f"{m} on {s}" for m, s in evaluations(lake) if m in trained or s in subsets
        ],
    }


def render_made_from(tree: dict) -> str:
    what = f"pack {tree['pack']}" if "pack" in tree else f"image {tree['image']}"
    return "\n".join(
        [
            f"{what}",
            f"  subsets: {', '.join(tree['subsets']) or '(none)'}",
            f"  models:  {', '.join(tree['models']) or '(none)'}",
            f"  exports: {', '.join(tree['exports']) or '(none)'}",
            f"  evaluations: {', '.join(tree['evaluations']) or '(none)'}",
        ]
    )
