"""The code location: every asset, check, sensor and the profile's resources."""

import dagster as dg

from assets.exports import exported_models
from assets.images import image_stages, raw_images
from assets.models import trained_models
from assets.packs import raw_packs
from assets.subsets import frozen_subsets
from assets.tables import image_tables
from orchestration.profiles import resources_for
from orchestration.sensors import image_automation, incoming_packs_sensor

ASSETS = [raw_packs, raw_images, image_stages, image_tables, frozen_subsets, trained_models, exported_models]

defs = dg.Definitions(
    assets=ASSETS,
    sensors=[incoming_packs_sensor, image_automation],
    resources=resources_for(),
)
