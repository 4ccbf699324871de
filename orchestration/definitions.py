"""The code location: every asset, check, sensor and the profile's resources."""

import dagster as dg

from assets.evaluations import model_evaluations
from assets.exports import exported_models
from assets.images import image_stages, raw_images
from assets.models import trained_models
from assets.packs import raw_packs
from assets.predictions import pack_predictions
from assets.shards import training_shards
from assets.subsets import frozen_subsets
from assets.tables import image_tables
from orchestration.profiles import resources_for
from orchestration.sensors import (
    incoming_packs_sensor,
    incoming_packs_sqs_sensor,
    owed_prefixes_sensor,
    pack_predictions_sensor,
)
from orchestration.settings import profile

ASSETS = [
    raw_packs,
    raw_images,
    image_stages,
    image_tables,
    frozen_subsets,
    training_shards,
    trained_models,
    exported_models,
    model_evaluations,
    pack_predictions,
]


def build_defs(profile_name: str | None = None, resources: dict | None = None) -> dg.Definitions:
    """The same assets in every profile; only the resources (and the event and labeller
    sensors: a queue, a labeller set) differ."""
    resources = resources or resources_for(profile_name or profile())
    sensors = [incoming_packs_sensor, owed_prefixes_sensor]
    if resources["pack_events"].queue_url:
        sensors.append(incoming_packs_sqs_sensor)
    if resources["labeller"].model:
        sensors.append(pack_predictions_sensor)
    return dg.Definitions(assets=ASSETS, sensors=sensors, resources=resources)


defs = build_defs()
