"""``Datasets.forget``: remove a pack, subset, model or export and its records, refused while
something made from it (a subset of the pack's images, a model of the subset, exports of the
model) is kept; evaluations of a model, or on a subset, go with it. Run history (Dagster's,
MLflow's) stays. ``ds``: the ``cvgraph.sdk.Datasets``
asking (this module does not import it: the SDK imports this)."""

from __future__ import annotations

from cvgraph.errors import InvalidRequest

KINDS = ("pack", "subset", "model", "export")


def users(ds, kind: str, key: str) -> tuple[str, list[str]]:
    """What keeps ``key`` from being forgotten: (what they are, their keys). Reads only what can
    use this kind: subset records for a pack, model records for a subset."""
    from workloads.layout import record_key, recorded

    if kind == "pack":
        subsets = recorded(ds.lake, "subset")
        return "subset(s)", [s for s in subsets if key in ds.record("subset", s)["packs"]]
    if kind == "subset":
        models = recorded(ds.lake, "model")
        return "model(s)", [m for m in models if ds.record("model", m)["subset"] == key]
    if kind == "model" and ds.lake.exists(record_key("export", key)):
        return "exports of", [key]
    return "", []


def forget(ds, kind: str, key: str) -> int:
    """Remove ``key`` of ``kind``; returns the number of lake objects removed (for a pack, its
    own objects and upload; the originals only it held go too, and its images' rows)."""
    from partitions import model_partitions_def, subset_partitions_def
    from workloads.layout import RECORDS, record_key

    if kind not in KINDS:
        raise InvalidRequest(f"forget {kind!r}: expected one of {', '.join(KINDS)}")
    ds.check_key(kind, key)
    ds.end_dead_runs()  # a killed command's run holds nothing
    if kind == "pack":
        return forget_pack(ds, key)
    record = record_key(kind, key)
    if not ds.lake.exists(record):
        if kind == "subset":
            left = _unfinished_freeze(ds, key)
            if left:
                return left
        if not ds.lake.keys(f"{RECORDS[kind][0]}{key}/"):
            ds.record(kind, key)  # UnknownKey, naming those there are
        # else a forget killed after the record went: finish it, unless a live run makes it now
        _refuse_if_made(ds, kind, key)
    _refuse_if_used(ds, kind, key)
    rest = [k for k in ds.lake.keys(f"{RECORDS[kind][0]}{key}/") if k != record]
    for k in [record, *rest]:  # the record (the commit marker) first: no reader takes it as kept
        ds.lake.delete(k)
    scores = scores_of(ds.lake, kind, key)
    for k in scores:
        ds.lake.delete(k)
    partitions = {"subset": subset_partitions_def, "model": model_partitions_def}.get(kind)
    if partitions and ds.instance.has_dynamic_partition(partitions.name, key):
        ds.instance.delete_dynamic_partition(partitions.name, key)
    return 1 + len(rest) + len(scores)


def _refuse_if_made(ds, kind: str, key: str) -> None:
    """``InvalidRequest`` if a live run is making ``key`` (its objects are there, its record not yet)."""
    from assets.exports import exported_models
    from assets.models import trained_models
    from assets.subsets import frozen_subsets
    from orchestration.runs import running

    asset = {"subset": frozen_subsets, "model": trained_models, "export": exported_models}[kind]
    runs = running(ds.instance, asset, key)
    if runs:
        raise InvalidRequest(
            f"{kind} {key!r} is being made (run {', '.join(runs)}): wait for it to end"
        )


def _unfinished_freeze(ds, key: str) -> int:
    """What a freeze of ``key`` that never committed left (its claim, maybe a manifest) and its
    partition, removed, unless such a freeze is still running; 0 if it left nothing."""
    from assets.subsets import frozen_subsets
    from orchestration.runs import running
    from partitions import subset_partitions_def
    from workloads.layout import subset_keys

    keys = subset_keys(key)
    if not ds.lake.exists(keys["claim"]):
        return 0
    runs = running(ds.instance, frozen_subsets, key)
    if runs:
        raise InvalidRequest(
            f"subset {key!r} is being frozen (run {', '.join(runs)}): wait for it to end (a run "
            "whose process is gone is ended by the next command, this one included)"
        )
    left = [keys[f] for f in ("manifest", "labels", "claim") if ds.lake.exists(keys[f])]
    for k in left:  # the claim last: until it goes, no other query takes the key
        ds.lake.delete(k)
    if ds.instance.has_dynamic_partition(subset_partitions_def.name, key):
        ds.instance.delete_dynamic_partition(subset_partitions_def.name, key)
    return len(left)


def scores_of(lake, kind: str, key: str) -> list[str]:
    """The objects of the evaluations of model ``key``, or on subset ``key``: nothing is made
    from an evaluation, so it goes with what it scored (each record first)."""
    from workloads.layout import evaluation_keys, evaluations

    if kind not in ("model", "subset"):
        return []
    pairs = [
        e
        for e in evaluations(lake, key if kind == "model" else None)
        if kind == "model" or e[1] == key
    ]
    keys = [evaluation_keys(m, s) for m, s in pairs]
    return [k[f] for k in keys for f in ("record", "confusion", "worst") if lake.exists(k[f])]


def _refuse_if_used(ds, kind: str, key: str) -> None:
    what, found = users(ds, kind, key)
    if found:
        raise InvalidRequest(
            f"{kind} {key!r} is used by {what} {', '.join(found)}: forget that first"
        )


def forget_pack(ds, pack_id: str) -> int:
    """Forget an ingested pack: its images leave the index and the tables (an image another
    pack also holds stays, labelled as that pack says) and its rows the predictions, the
    originals and variants no other pack holds are deleted, then the pack's own objects, its
    upload and its partition.

    The index step does the dropping: ``.forget`` markers, which ``sync`` runs the prefixes'
    index for, then their variants and tables, the same versioned steps as an ingest, so each
    prefix converges to the data versions it had without the pack. Killed part way, the same
    command (or a ``sync``) finishes it."""
    from partitions import pack_partitions_def
    from workloads.index import mark_forgotten
    from workloads.layout import PACKS, pack_keys, pending_packs, prediction_keys
    from workloads.predictions import forget_predictions

    lake = ds.lake
    own = lake.keys(f"{PACKS}{pack_id}/")
    if not lake.exists(pack_keys(pack_id)["record"]) and not own:
        ds.record("pack", pack_id)  # UnknownKey, naming the packs there are
    _refuse_if_used(ds, "pack", pack_id)
    waiting = sorted(pending_packs(lake) - {pack_id})
    if waiting:
        raise InvalidRequest(
            f"pack(s) {', '.join(waiting)} wait for `cvgraph sync`: sync first, then forget {pack_id!r}"
        )
    # The upload goes first: a zip with no pack record is owed an ingest (assets.owed), so
    # a forget killed after the record went must leave no zip behind.
    removed = [k for k in _uploads_of(lake, pack_id) if lake.exists(k)]
    for k in removed:
        lake.delete(k)
    mark_forgotten(lake, pack_id)  # from here the pack is not an ingested pack
    removed += [prediction_keys(pack_id)["part"]] * forget_predictions(lake, pack_id)
    if ds.instance.has_dynamic_partition(pack_partitions_def.name, pack_id):
        ds.instance.delete_dynamic_partition(pack_partitions_def.name, pack_id)
    ds.sync(packs=False)  # the index of the marked prefixes, then their variants and tables
    for k in own:
        lake.delete(k)
    return len(own) + len(removed)


def _uploads_of(lake, pack_id: str) -> list[str]:
    """The ``incoming/`` keys that are this pack: ``incoming/<pack id>.zip`` unless the name had
    to be cleaned, then by one listing."""
    from workloads.layout import INCOMING, incoming_key, pack_id_for

    if pack_id_for(incoming_key(pack_id)) == pack_id and lake.exists(incoming_key(pack_id)):
        return [incoming_key(pack_id)]
    return [k for k in lake.keys(INCOMING) if pack_id_for(k) == pack_id]
