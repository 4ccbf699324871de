"""A subset's or model's partition key, checked where an asset step takes it."""

import dagster as dg

from workloads.layout import check_name


def require_key(kind: str, key: str) -> str:
    """``check_name`` for an asset step: a bad partition key fails the step with the reason."""
    try:
        return check_name(kind, key)
    except ValueError as e:
        raise dg.Failure(description=str(e)) from None
