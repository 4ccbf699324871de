"""What a model is trained with: the spec's fields, their defaults and their limits. Free of
torch and dagster, so the trainer, the asset's config and the CLI's flags share one list.

The defaults were chosen by measurement on the packs the tests build (README, "Training")."""

from __future__ import annotations

import re

from workloads.layout import VARIANT_COLUMNS

ARCHS = ("small_cnn", "resnet18", "mobilenet_v3_small")
AUGMENT_LEVELS = ("none", "light", "standard")
TASKS = ("classification", "detection")
DETECTION_ARCHS = ("resnet18", "mobilenet_v3_small")  # the backbones a detector is built on
TOP_K = 100  # a detector's detections per image (COCO's evaluation counts at most 100)

# field: (default, what it is) — the one place both are written
FIELDS: dict[str, tuple[object, str]] = {
    "task": (
        "classification",
        "classification (a label per image) or detection (boxes of the subset's categories)",
    ),
    "arch": ("mobilenet_v3_small", f"the network: {', '.join(ARCHS)}"),
    "epochs": (0, "passes over the train split; 0: as many as min_steps needs, 8 at least"),
    "min_steps": (600, "optimizer steps epochs=0 trains for at least (small subsets: more epochs)"),
    "lr": (0.003, "AdamW's peak learning rate (after warm-up, then cosine to zero)"),
    "warmup": (0.05, "share of the steps the learning rate warms up over"),
    "weight_decay": (0.0005, "AdamW's weight decay"),
    "label_smoothing": (0.1, "of the cross-entropy's targets"),
    "batch_size": (64, "images per step"),
    "input_size": (32, "side of the model's square input"),
    "variant": ("resized", "the images it learns from (resized and original: RGB; edges: gray)"),
    "augment": ("light", f"train-time augmentation: {', '.join(AUGMENT_LEVELS)}"),
    "patience": (0, "stop after this many epochs without a better val loss (0: never)"),
    "seed": (0, "of the weights, the order and the augmentation"),
    "width": (0, "channels of the first stage (0: the arch's default)"),
    "init_from": (
        "",
        "MODEL[@VERSION]: start from a registered version's weights (a new head if the classes differ)",
    ),
    "entry_point": (
        "",
        "a training script of your own instead of the built-in trainer (SageMaker script mode; "
        "its folder goes with it): it writes model.onnx and metrics.json (README, Bring your own "
        "trainer)",
    ),
    "training_image": (
        "",
        "the SageMaker image an entry_point runs in (default: cvgraph's training image)",
    ),
}
# Fields added to the spec after models were trained, with the value those models had: an old
# record's spec read with them is still the same training.
ADDED_FIELDS = {"task": "classification", "entry_point": "", "training_image": ""}
TRAIN_SPEC = {name: default for name, (default, _) in FIELDS.items()}
# A detector's own defaults, over TRAIN_SPEC's (measured on the demo's shapes pack, README)
TASK_DEFAULTS: dict[str, dict] = {
    "classification": {},
    "detection": {
        "arch": "resnet18",
        "variant": "original",  # boxes need the pixels: the 64 px resized variant is too small
        "input_size": 96,
        "batch_size": 16,
        "min_steps": 1500,
        "lr": 0.002,
        "label_smoothing": 0.0,
    },
}


# what a task's models are scored and compared by: the test split's in a model's record
# (``test_<metric>``), an evaluation's ``scores[<metric>]``, the champion rule's
SCORE = {"classification": "accuracy", "detection": "map"}
SCORE_NAME = {"accuracy": "accuracy", "map": "mAP@[.5:.95]"}


def task_of(spec_or_record: dict) -> str:
    """The task of a spec, a model's record or its arch (classification when it predates tasks)."""
    spec = spec_or_record.get("spec", spec_or_record)
    return spec.get("task") or spec_or_record.get("arch", {}).get("task") or "classification"


def test_score(record: dict) -> tuple[str, float]:
    """(its name, the value) of a model record's test score: accuracy, a detector's mAP."""
    metric = SCORE[task_of(record)]
    return f"test {SCORE_NAME[metric]}", record[f"test_{metric}"]


def evaluation_score(evaluation: dict) -> tuple[str, float | None]:
    """(its name, the value) of an evaluation record's score: accuracy, a detector's mAP."""
    scores = evaluation.get("scores", {})
    metric = SCORE[scores.get("task", "classification")]
    return SCORE_NAME[metric], scores.get(metric)


def task_defaults(task: str) -> dict:
    """The spec's defaults for ``task``: ``TRAIN_SPEC`` with the task's own."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    return {**TRAIN_SPEC, **TASK_DEFAULTS[task], "task": task}


MINIMUM = {
    "epochs": 0,
    "min_steps": 0,
    "batch_size": 1,
    "input_size": 16,
    "seed": 0,
    "width": 0,
    "patience": 0,
    "warmup": 0,
    "weight_decay": 0,
    "label_smoothing": 0,
}
MAXIMUM = {"warmup": 0.5, "label_smoothing": 0.5, "input_size": 512}
CHOICES = {
    "task": TASKS,
    "arch": ARCHS,
    "augment": AUGMENT_LEVELS,
    "variant": tuple(VARIANT_COLUMNS),
}


AUTO_EPOCHS_AT_LEAST = 8


def epochs_for(spec: dict, train_images: int) -> int:
    """The passes a training makes: ``epochs``, or (0) enough for ``min_steps`` optimizer steps
    over ``train_images`` in batches of ``batch_size``, and ``AUTO_EPOCHS_AT_LEAST`` at least."""
    if spec["epochs"]:
        return spec["epochs"]
    steps_per_epoch = max(1, -(-train_images // spec["batch_size"]))
    return max(AUTO_EPOCHS_AT_LEAST, -(-spec["min_steps"] // steps_per_epoch))


INIT_FROM = re.compile(r"^(?P<model>[A-Za-z0-9._-]{1,100})(?:@(?P<version>[1-9][0-9]*))?$")


def parse_init_from(value: str) -> tuple[str, str | None]:
    """(model, version or None: its latest) of an ``init_from`` value, else ValueError."""
    m = INIT_FROM.match(value)
    if not m:
        raise ValueError(
            f"init_from {value!r}: expected MODEL or MODEL@VERSION (e.g. digits_cnn@2)"
        )
    return m["model"], m["version"]


def channels(variant: str) -> int:
    """Input channels a variant gives: RGB for photos, one for edge maps."""
    return 1 if variant == "edges" else 3


def check_spec(spec: dict) -> dict:
    """``spec`` if every field is known and in range, else ValueError naming the first that is not."""
    for name, value in spec.items():
        if name not in TRAIN_SPEC:
            raise ValueError(f"unknown spec field {name!r} (fields: {', '.join(TRAIN_SPEC)})")
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} {value!r}: expected one of {', '.join(CHOICES[name])}")
        if name == "lr" and not 0 < value <= 1:
            raise ValueError(f"lr must be in (0, 1], not {value}")
        if name in MINIMUM and value < MINIMUM[name]:
            raise ValueError(f"{name} must be {MINIMUM[name]} or more, not {value}")
        if name == "init_from" and value:
            parse_init_from(value)
        if name in MAXIMUM and value > MAXIMUM[name]:
            raise ValueError(f"{name} must be {MAXIMUM[name]} or less, not {value}")
    if spec.get("entry_point"):
        if spec.get("task", "classification") != "classification":
            raise ValueError("an entry_point trains a classifier (task classification)")
        if spec.get("init_from"):
            raise ValueError("an entry_point trains its own way: drop init_from")
    elif spec.get("training_image"):
        raise ValueError("training_image is the image of an entry_point: give the entry_point")
    if spec.get("task") == "detection":
        if spec.get("arch", DETECTION_ARCHS[0]) not in DETECTION_ARCHS:
            raise ValueError(
                f"a detector is built on {' or '.join(DETECTION_ARCHS)}, not {spec['arch']}"
            )
        if spec.get("init_from"):
            raise ValueError("init_from starts a classifier from another; a detector starts anew")
        if spec.get("input_size", 32) % 32:
            raise ValueError(
                f"a detector's input_size is a multiple of 32, not {spec['input_size']}"
            )
    return spec
