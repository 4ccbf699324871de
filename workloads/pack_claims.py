"""What other packs already say about a pack's images: which of them another committed pack
holds (so they are duplicates, not new), and the labels they give them (so a pack that labels
an image otherwise is told which label the index keeps)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from workloads.index import label_order
from workloads.lake import parquet_table
from workloads.layout import PENDING_RAW, marker_pack, pack_keys, pack_prefix_key, raw_index_key

# (label, its source, [pack, member] it came from)
Claim = tuple[str | None, str | None, list[str]]


def claims_elsewhere(lake, pack_id: str, shas: set[str]) -> dict[str, list[Claim]]:
    """Those of ``shas`` that a committed pack other than ``pack_id`` lists, with the label each
    gives: per prefix of them, its index (packs merged: the label it keeps) and its pending
    committed packs (not merged yet: each member's label). Reads what those prefixes hold,
    never every pack's manifest."""
    claims: dict[str, list[Claim]] = {}
    by_prefix: dict[str, set[str]] = {}
    for sha in shas:
        by_prefix.setdefault(sha[:2], set()).add(sha)
    for prefix, wanted in sorted(by_prefix.items()):
        value_set = pa.array(sorted(wanted), pa.string())
        if lake.exists(raw_index_key(prefix)):
            cols = ["sha256", "packs", "label", "label_source", "label_from"]
            index = parquet_table(lake.get(raw_index_key(prefix)), columns=cols)
            for r in index.filter(pc.is_in(index["sha256"], value_set=value_set)).to_pylist():
                if set(r["packs"]) - {pack_id}:
                    claims.setdefault(r["sha256"], []).append(
                        (r["label"], r["label_source"], list(r["label_from"] or []))
                    )
        for key in lake.keys(f"{PENDING_RAW}{prefix}/"):
            marker = marker_pack(key)
            if marker is None or marker[1] or marker[0] == pack_id:
                continue
            other = marker[0]
            if not lake.exists(pack_keys(other)["record"]):  # uncommitted, or being forgotten
                continue
            rows = parquet_table(
                lake.get(pack_prefix_key(other, prefix)),
                columns=["sha256", "member", "label", "label_source"],
            )
            for r in rows.filter(pc.is_in(rows["sha256"], value_set=value_set)).to_pylist():
                claims.setdefault(r["sha256"], []).append(
                    (r["label"], r["label_source"], [other, r["member"]])
                )
    return claims


def label_conflicts(pack_id: str, rows: list[dict], claims: dict[str, list[Claim]]) -> list[dict]:
    """The pack's images that two labels are given (by another pack, or twice in this one):
    ``{"sha256", "member", "labels": {"pack/member": label}, "kept"}``, ``kept`` being the label
    the index keeps (the index's rule: ``index.label_order``)."""
    mine: dict[str, list[Claim]] = {}
    for r in rows:
        mine.setdefault(r["sha256"], []).append(
            (r["label"], r["label_source"], [pack_id, r["member"]])
        )
    out = []
    for sha, own in sorted(mine.items()):
        seen = [c for c in [*own, *claims.get(sha, [])] if c[0] is not None]
        if len({label for label, _, _ in seen}) < 2:
            continue
        kept = min(seen, key=lambda c: label_order(c[1], c[2]))
        out.append(
            {
                "sha256": sha,
                "member": own[0][2][1],
                "labels": {"/".join(origin): label for label, _, origin in seen},
                "kept": kept[0],
            }
        )
    return out
