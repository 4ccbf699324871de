from workloads.versions import HASH_PREFIXES, merkle_root, params_id, prefix_version, split_for


def test_prefixes_are_256_two_hex_digits_in_order():
    assert len(HASH_PREFIXES) == 256
    assert HASH_PREFIXES[0] == "00" and HASH_PREFIXES[-1] == "ff"
    assert list(HASH_PREFIXES) == sorted(HASH_PREFIXES)


def test_prefix_version_is_order_independent_and_param_sensitive():
    a = prefix_version(["b" * 64, "a" * 64], "p1")
    assert a == prefix_version(["a" * 64, "b" * 64], "p1")
    assert a != prefix_version(["a" * 64, "b" * 64], "p2")
    assert a != prefix_version(["a" * 64], "p1")


def test_merkle_root_changes_with_any_leaf_and_not_with_order():
    v = {p: f"v{p}" for p in HASH_PREFIXES}
    root = merkle_root(v)
    assert root == merkle_root(dict(reversed(list(v.items()))))
    changed = dict(v, **{"7f": "other"})
    assert merkle_root(changed) != root


def test_split_is_deterministic_and_roughly_80_10_10():
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    splits = [split_for(s) for s in shas]
    assert splits == [split_for(s) for s in shas]
    share = {k: splits.count(k) / len(splits) for k in ("train", "val", "test")}
    assert (
        0.77 < share["train"] < 0.83 and 0.08 < share["val"] < 0.12 and 0.08 < share["test"] < 0.12
    )


def test_params_id_is_stable():
    assert params_id({"size": 64, "q": 90}) == params_id({"q": 90, "size": 64})
    assert params_id({"size": 64}) != params_id({"size": 65})
