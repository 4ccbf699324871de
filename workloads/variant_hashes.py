"""The hash index of an image stage's outputs in a prefix (``{original sha256: output sha256}``):
the record of what is done, read instead of listing the outputs.

A shard task keeps its own hashes beside the prefix's index until the merge folds them in, and
marks its prefix (or shard) in flight so the task after a kill can keep what it finished.
``params`` is anything with ``stage_id(stage)`` (``workloads.image_params.ImageParams``).
"""

from __future__ import annotations

from workloads.lake import read_parquet, write_parquet
from workloads.layout import hashes_key, inflight_key, output_dir, output_key
from workloads.versions import sha256_hex


def read_hashes(lake, stage: str, params, prefix: str) -> dict[str, str]:
    return read_hash_table(lake, hashes_key(stage, params, prefix))


def read_hash_table(lake, key: str) -> dict[str, str]:
    try:
        t = read_parquet(lake, key)
    except FileNotFoundError:
        return {}
    return dict(zip(t["sha256"].to_pylist(), t["output_sha256"].to_pylist()))


def write_hash_table(lake, key: str, hashes: dict[str, str]) -> None:
    import pyarrow as pa

    rows = sorted(hashes.items())
    write_parquet(
        lake,
        key,
        pa.table(
            {
                "sha256": pa.array([r[0] for r in rows], pa.string()),
                "output_sha256": pa.array([r[1] for r in rows], pa.string()),
            }
        ),
    )


def update_hashes(
    lake,
    stage: str,
    params,
    prefix: str,
    old: dict[str, str],
    fresh: dict[str, str],
    present: set[str],
) -> None:
    """Merge this run's output hashes into the prefix's hash index: the record of what is done
    (an output a killed run left without its hash is not done, and is written again, with the
    same bytes). Outputs of images no longer ``present`` in the raw index (their pack was
    forgotten) are deleted first, then left out of the index."""
    known = {**old, **fresh}
    for sha in sorted(set(known) - present):
        lake.delete(output_key(stage, params, prefix, sha))
        del known[sha]
    if not known and old:  # none left: as if none had been made (a missing index reads as empty)
        lake.delete(hashes_key(stage, params, prefix))
    elif known != old:
        write_hash_table(lake, hashes_key(stage, params, prefix), known)


def shard_of(sha: str, shards: int) -> int:
    """The shard of a prefix an image belongs to (from hash digits after the prefix's own)."""
    return int(sha[2:8], 16) % shards


def recover_inflight(
    lake,
    stage: str,
    params,
    prefix: str,
    hashes: dict[str, str],
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Mark the prefix (or shard) in flight. If the last task on it was killed (its mark is still
    there), add the whole outputs it left to ``hashes`` by one listing, so the work it finished is
    kept: the only listing of outputs, and only after a kill."""
    mark = inflight_key(stage, params, prefix, shard)
    if lake.exists(mark):
        base = output_dir(stage, params, prefix)
        for key in lake.keys(base):
            sha = key[len(base) :].split(".")[0]
            if sha not in hashes and (
                shard[1] == 1 or shard_of(sha, shard[1]) == shard[0]
            ):  # a shard takes only its own
                hashes[sha] = sha256_hex(lake.get(key))
    else:
        lake.put(mark, b"")


def hashes_among(lake, stage: str, params, prefix: str, shas) -> dict[str, str]:
    """The hash index of ``stage`` for just ``shas`` (a pyarrow array; filtered in Arrow, not as
    Python rows)."""
    import pyarrow.compute as pc

    key = hashes_key(stage, params, prefix)
    if not lake.exists(key):
        return {}
    t = read_parquet(lake, key)
    t = t.filter(pc.is_in(t["sha256"], value_set=shas))
    return dict(zip(t["sha256"].to_pylist(), t["output_sha256"].to_pylist()))
