# syntax=docker/dockerfile:1
# cvgraph training image for SageMaker (bring-your-own container).
#
# SageMaker starts the container as `docker run <image> train`, so `train` must be an executable
# on PATH; it runs `python -m workloads.train`, which reads SageMaker's layout:
#   /opt/ml/input/config/hyperparameters.json, /opt/ml/input/data/<channel>/, /opt/ml/model,
#   /opt/ml/output/data, /opt/ml/checkpoints (synced with S3 for managed spot).
#
# Build from the repository root, for linux/amd64 (SageMaker ml.* CPU instances):
#   docker build --platform linux/amd64 -f deploy/docker/training.Dockerfile -t cvgraph-training .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH=/opt/cvgraph

# The CPU build of torch from PyTorch's own index: the PyPI wheel pulls several GB of CUDA
# libraries that a CPU instance never uses. Then the rest from PyPI, pinned to the versions the
# test suite runs against.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && pip install \
        "numpy==2.4.6" \
        "opencv-python-headless==5.0.0.93" \
        "pyarrow==25.0.1" \
        "boto3==1.44.5" \
        "dagster-pipes==1.13.27"

WORKDIR /opt/cvgraph
COPY workloads/ /opt/cvgraph/workloads/

# SageMaker's channels live at /opt/ml/input/data/<name>. The SM_CHANNEL_* variables are set by
# the sagemaker-training toolkit, not by SageMaker itself, so the entry defaults them to the
# standard paths (an explicit value, as the local trainer sets, still wins).
RUN printf '%s\n' \
        '#!/bin/sh' \
        'set -e' \
        ': "${SM_INPUT_CONFIG_DIR:=/opt/ml/input/config}"' \
        ': "${SM_CHANNEL_MANIFEST:=/opt/ml/input/data/manifest}"' \
        ': "${SM_CHANNEL_IMAGES:=/opt/ml/input/data/images}"' \
        ': "${SM_MODEL_DIR:=/opt/ml/model}"' \
        ': "${SM_OUTPUT_DATA_DIR:=/opt/ml/output/data}"' \
        'export SM_INPUT_CONFIG_DIR SM_CHANNEL_MANIFEST SM_CHANNEL_IMAGES SM_MODEL_DIR SM_OUTPUT_DATA_DIR' \
        'exec python -m workloads.train "$@"' \
        > /usr/local/bin/train \
    && chmod 0755 /usr/local/bin/train \
    && python -m compileall -q /opt/cvgraph/workloads

# Runs as root, on purpose: SageMaker mounts /opt/ml (model, output, checkpoints) owned by
# root and expects the training container to write there.
CMD ["train"]
