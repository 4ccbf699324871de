"""What a model is trained with: the spec's fields, their defaults and their limits. Free of
torch and dagster, so the trainer, the asset's config and the CLI's flags share one list."""

from __future__ import annotations

from workloads.layout import VARIANT_COLUMNS

TRAIN_SPEC = {
    "epochs": 8,
    "lr": 0.003,
    "batch_size": 64,
    "input_size": 32,  # side of the square grayscale input; the CNN pools twice, then to 4x4
    "variant": "resized",
    "seed": 0,
    "width": 16,  # channels of the first convolution (then 2x, 4x)
}
MINIMUM = {"epochs": 1, "batch_size": 1, "input_size": 16, "seed": 0, "width": 1}


def check_spec(spec: dict) -> dict:
    """``spec`` if every field is known and in range, else ValueError naming the first that is not."""
    for name, value in spec.items():
        if name not in TRAIN_SPEC:
            raise ValueError(f"unknown spec field {name!r} (fields: {', '.join(TRAIN_SPEC)})")
        if name == "variant" and value not in VARIANT_COLUMNS:
            raise ValueError(f"variant {value!r}: expected one of {', '.join(VARIANT_COLUMNS)}")
        if name == "lr" and not 0 < value <= 1:
            raise ValueError(f"lr must be in (0, 1], not {value}")
        if name in MINIMUM and value < MINIMUM[name]:
            raise ValueError(f"{name} must be {MINIMUM[name]} or more, not {value}")
    return spec
