# syntax=docker/dockerfile:1
# cvgraph training image for SageMaker (bring-your-own container).
#
# SageMaker starts the container as `docker run <image> train`, so `train` must be an executable
# on PATH; it runs `python -m workloads.training.train`, which reads SageMaker's layout:
#   /opt/ml/input/config/hyperparameters.json, /opt/ml/input/data/<channel>/, /opt/ml/model,
#   /opt/ml/output/data, /opt/ml/checkpoints (synced with S3 for managed spot).
#
# Build from the repository root, for linux/amd64 (SageMaker ml.* CPU instances):
#   docker build --platform linux/amd64 -f deploy/docker/training.Dockerfile -t cvgraph-training .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH=/opt/cvgraph

# Versions from requirements.lock, the lock the test suite's venv is installed from (used as
# constraints, so the dependencies of these are pinned too). torch is the CPU build from
# PyTorch's own index, alone (--no-deps: that index is for torch, not for its dependencies);
# the PyPI wheel pulls several GB of CUDA libraries that a CPU instance never uses. The second
# install finds torch in place and takes its dependencies from PyPI at the locked versions.
COPY requirements.lock /opt/cvgraph/requirements.lock
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
    && pip install -c /opt/cvgraph/requirements.lock \
        torch \
        numpy \
        opencv-python-headless \
        pillow \
        pyarrow \
        boto3 \
        dagster-pipes \
        mlflow-skinny \
        pycocotools

WORKDIR /opt/cvgraph
COPY workloads/ /opt/cvgraph/workloads/

# SageMaker's channels live at /opt/ml/input/data/<name>: shards (FastFile: the subset's training
# shards, streamed as read) and init (the weights a fine-tune starts from). The SM_CHANNEL_* variables are set by
# the sagemaker-training toolkit, not by SageMaker itself, so the entry defaults them to the
# standard paths (an explicit value, as the local trainer sets, still wins).
RUN printf '%s\n' \
        '#!/bin/sh' \
        'set -e' \
        ': "${SM_INPUT_CONFIG_DIR:=/opt/ml/input/config}"' \
        ': "${SM_CHANNEL_SHARDS:=/opt/ml/input/data/shards}"' \
        ': "${SM_CHANNEL_INIT:=/opt/ml/input/data/init}"' \
        ': "${SM_MODEL_DIR:=/opt/ml/model}"' \
        ': "${SM_OUTPUT_DATA_DIR:=/opt/ml/output/data}"' \
        'export SM_INPUT_CONFIG_DIR SM_CHANNEL_SHARDS SM_CHANNEL_INIT SM_MODEL_DIR SM_OUTPUT_DATA_DIR' \
        'exec python -m workloads.training.train "$@"' \
        > /usr/local/bin/train \
    && chmod 0755 /usr/local/bin/train \
    && python -m compileall -q /opt/cvgraph/workloads

# Runs as root, on purpose: SageMaker mounts /opt/ml (model, output, checkpoints) owned by
# root and expects the training container to write there.
# checkov:skip=CKV_DOCKER_3: SageMaker's /opt/ml mounts are root-owned; a non-root user could not write the model
# No HEALTHCHECK: a training job is not a service; SageMaker watches its exit code and its metrics.
# checkov:skip=CKV_DOCKER_2: a batch container that exits when done; SageMaker judges it by its exit code
CMD ["train"]
