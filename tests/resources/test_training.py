"""The SageMaker trainer's refusals that need no AWS: a lake SageMaker cannot read."""

import dagster as dg
import pytest

from resources.training import SageMakerTrainer, TrainingFailed
from workloads.lake import LocalLake


@pytest.mark.parametrize("call", ["train", "tune"])
def test_sagemaker_refuses_a_local_lake_before_it_makes_a_client(call, tmp_path, monkeypatch):
    """Said in the trainer's words, not botocore's (no region is configured here)."""
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    trainer = SageMakerTrainer(role_arn="arn:aws:iam::1:role/r", training_image="img:1")
    lake, ctx = LocalLake(tmp_path / "lake"), dg.build_asset_context()
    with pytest.raises(TrainingFailed, match="^SageMakerTrainer needs the lake on S3$"):
        if call == "train":
            trainer.train(ctx, lake, "job", "subsets/s/shards/resized", "m", {})
        else:
            trainer.tune(
                ctx, lake, plan=None, shards_key="subsets/s/shards/resized", hyperparameters={}
            )
