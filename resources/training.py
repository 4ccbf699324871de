"""Training role: run ``workloads.train`` with SageMaker's layout, bring the model back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import dagster as dg

from workloads.lake import LocalLake


class TrainingFailed(Exception):
    pass


def model_keys(model_key: str) -> dict[str, str]:
    base = f"models/{model_key}"
    return {"model": f"{base}/model.pt", "metrics": f"{base}/metrics.json", "record": f"{base}/model.json", "curves": f"{base}/curves.png"}


class Trainer(dg.ConfigurableResource, ABC):
    @abstractmethod
    def train(self, context: dg.AssetExecutionContext, lake, job_name: str, manifest_key: str, model_key: str, hyperparameters: dict) -> dict:
        """Train on the subset manifest at ``manifest_key``; store ``model.pt`` and ``metrics.json``
        under ``models/<model_key>/`` in the lake; return the metrics."""


class LocalTrainer(Trainer):
    """A subprocess with SageMaker's file and env layout; the images channel is the lake itself."""

    work_dir: str

    def train(self, context, lake, job_name, manifest_key, model_key, hyperparameters):
        if not isinstance(lake, LocalLake):
            raise TrainingFailed("LocalTrainer reads images in place and needs the local lake; use the aws profile's trainer for S3")
        job = Path(self.work_dir) / job_name
        shutil.rmtree(job, ignore_errors=True)
        dirs = {name: job / name for name in ("input/config", "input/data/manifest", "model", "output/data", "checkpoints")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        hp = {**hyperparameters, "checkpoint_dir": str(dirs["checkpoints"])}
        # SageMaker writes every hyperparameter as a string.
        (dirs["input/config"] / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
        (dirs["input/data/manifest"] / "manifest.parquet").write_bytes(lake.get(manifest_key))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SM_INPUT_CONFIG_DIR": str(dirs["input/config"]),
            "SM_CHANNEL_MANIFEST": str(dirs["input/data/manifest"]),
            "SM_CHANNEL_IMAGES": str(lake.root),
            "SM_MODEL_DIR": str(dirs["model"]),
            "SM_OUTPUT_DATA_DIR": str(dirs["output/data"]),
            "TRAINING_JOB_NAME": job_name,
        }
        context.log.info(f"training job {job_name}: {hp}")
        proc = subprocess.Popen([sys.executable, "-m", "workloads.train"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail: list[str] = []
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if line.startswith(("epoch=", "test_", "train=", "resumed")):
                    context.log.info(line)
            proc.wait()
        except BaseException:  # cancelled: stop the job, as StopTrainingJob would
            proc.kill()
            raise
        if proc.returncode != 0:
            raise TrainingFailed(f"training job {job_name} exited {proc.returncode}:\n" + "\n".join(tail))
        keys = model_keys(model_key)
        lake.put_file(keys["model"], dirs["model"] / "model.pt")
        lake.put_file(keys["metrics"], dirs["model"] / "metrics.json")
        return json.loads((dirs["model"] / "metrics.json").read_text())
