"""Labeller role: which exported classifier labels new packs (``CVGRAPH_LABELLER``), resolved to
the export that scores them, and the command of the job that does (``workloads.predictions``).

The labeller is a model key. Its packs are scored with the ONNX export in the lake
(``exports/<key>/onnx/model.onnx``) when that export is of the registered model's ``champion``
(the MLflow alias ``model_evaluations`` moves); when the model has no champion yet (never
evaluated), with its latest export, and every record and listing says so. An export of another
version than the champion is refused: the lake holds one export per model key, so the champion's
is then not there to score with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from workloads.lake import get_json
from workloads.layout import export_keys, model_keys, record_key, recorded
from workloads.predictions import Scoring

CHAMPION = "champion"  # the registered model's alias (resources.tracking.CHAMPION)
NO_LABELLER = (
    "no labeller: set CVGRAPH_LABELLER to the key of an exported classifier (README, Settings)"
)


class LabellerRefused(ValueError):
    """The labeller cannot score: none is set, or it has no usable export. One line, for the
    user."""


@dataclass(frozen=True)
class LabellerExport:
    """The export a labeller scores with: ``model`` v``version``'s ONNX file and preprocess."""

    model: str
    version: int
    onnx_key: str
    onnx_sha256: str
    preprocess_key: str
    champion: bool  # False: the model has no champion yet; its latest export scores

    @property
    def note(self) -> str:
        """How it was chosen, for logs, metadata and listings."""
        if self.champion:
            return f"{self.model} v{self.version} (the champion)"
        return f"{self.model} v{self.version} (no champion yet: its latest export)"

    def scoring(self, pack: str) -> Scoring:
        return Scoring(
            pack=pack,
            model=self.model,
            version=self.version,
            onnx_key=self.onnx_key,
            onnx_sha256=self.onnx_sha256,
            preprocess_key=self.preprocess_key,
        )


def predictions_command(lake_url: str, run_id: str, job: Scoring) -> list[str]:
    """The scoring job of one pack: the Docker image's command and the local pool's call."""
    return [
        "python",
        "-m",
        "workloads.predictions",
        "--lake",
        lake_url,
        "--run-id",
        run_id,
        "--pack",
        job.pack,
        "--model",
        job.model,
        "--version",
        str(job.version),
        "--onnx",
        job.onnx_key,
        "--onnx-sha256",
        job.onnx_sha256,
        "--preprocess",
        job.preprocess_key,
    ]


class Labeller(dg.ConfigurableResource):
    """``model``: the labeller's key (CVGRAPH_LABELLER; None: no labeller). ``tracking_uri``: the
    MLflow registry that says which version is its champion."""

    model: str | None = None
    tracking_uri: str = ""

    def champion(self) -> int | None:
        """The version the alias ``champion`` of the registered model names; None when the model
        is not registered or has no champion."""
        from mlflow.exceptions import MlflowException

        if (
            self.tracking_uri.startswith("sqlite:///")
            and not Path(self.tracking_uri.removeprefix("sqlite:///")).exists()
        ):
            return None  # no store yet: nothing was ever registered (and none is made here)
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        try:
            return int(client.get_model_version_by_alias(self.model, CHAMPION).version)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise LabellerRefused(
                f"labeller {self.model}: the model registry did not say its champion: "
                f"{' '.join(str(e.message).split())[:300]}"
            ) from None

    def export(self, lake) -> LabellerExport:
        """The export that scores packs now; ``LabellerRefused`` (one line) when there is none:
        no labeller set, a model with no export, a detector, an export of another version than
        the champion."""
        if not self.model:
            raise LabellerRefused(NO_LABELLER)
        model = self.model
        keys = export_keys(model)
        record = get_json(lake, keys["record"])
        if record is None:
            if not lake.exists(model_keys(model)["record"]):
                known = recorded(lake, "export")
                raise LabellerRefused(
                    f"labeller {model!r} (CVGRAPH_LABELLER) is no trained model (exported "
                    f"models: {', '.join(known[:20]) or 'none yet'})"
                )
            raise LabellerRefused(
                f"labeller {model!r} has no export: `cvgraph export {model}` first"
            )
        pre = get_json(lake, keys["preprocess"])
        if pre is None:
            raise LabellerRefused(
                f"labeller {model!r} was exported before preprocess.json: `cvgraph export {model}` again"
            )
        if pre["output"]["name"] != "logits":
            raise LabellerRefused(
                f"labeller {model!r} is a detector: pack predictions are a classifier's classes "
                "(set CVGRAPH_LABELLER to an exported classifier)"
            )
        if not record.get("model_version"):
            raise LabellerRefused(
                f"labeller {model!r} was exported before the model registry: `cvgraph export {model}` again"
            )
        version = int(record["model_version"])
        champion = self.champion()
        if champion is not None and champion != version:
            remedy = (
                f"`cvgraph export {model}` exports it"
                if champion > version
                else f"evaluate v{version} (it becomes the champion if it scores higher) or set "
                "CVGRAPH_LABELLER to another model"
            )
            raise LabellerRefused(
                f"labeller {model!r}: its champion is v{champion}, but {record_key('export', model)} "
                f"is v{version}'s export; packs are scored by the champion's export only: {remedy}"
            )
        return LabellerExport(
            model=model,
            version=version,
            onnx_key=keys["onnx"],
            onnx_sha256=record["formats"]["onnx"]["sha256"],
            preprocess_key=keys["preprocess"],
            champion=champion is not None,
        )
