# syntax=docker/dockerfile:1
# cvgraph worker: runs the prefix workloads `python -m workloads.chain|index|images|tables ...` as
# AWS Batch array children (a group of hash prefixes each; chain: index, images and tables of the
# group in one child), and `python -m workloads.ingest|predictions ...` for a pack.
#
# Build from the repository root (the context must contain workloads/), for linux/amd64 (the job
# definition's RuntimePlatform):
#   docker build --platform linux/amd64 -f deploy/docker/worker.Dockerfile -t cvgraph-worker .
#
# Entry: no ENTRYPOINT, and the default CMD is the workload's help. The orchestrator's Batch
# client submits the *full* command in containerOverrides.command, e.g.
#   ["python", "-m", "workloads.images", "--lake", "s3://bucket/", "--run-id", "...",
#    "--stages", "resize", "--prefixes", "00,01,..."]
# which is exactly the local pool's call, so one command line runs in both places; an array
# child picks its prefix from AWS_BATCH_JOB_ARRAY_INDEX. Locally:
#   docker run --rm cvgraph-worker python -m workloads.images --help

FROM python:3.11-slim

# MALLOC_*: glibc's default thresholds cost page faults on large decode buffers (+7% measured
# on the fast path). PYTHONUNBUFFERED: every result line reaches CloudWatch as it is printed.
ENV MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/cvgraph

# Only what the worker's modules import (workloads.chain/images/ingest/index/tables/tasks/
# planning/kernels/lake/s3lake/versions; onnxruntime for workloads.predictions), at the versions of
# requirements.lock: the lock the test suite's venv is installed from, used as constraints (it
# pins their dependencies too). Not `pip install .`: the project's dependencies are the
# orchestrator's (dagster, mlflow, torch, ...), ~3 GB the worker never imports.
# tests/deploy/test_deploy.py checks this list against the imports and the lock.
COPY requirements.lock /opt/cvgraph/requirements.lock
RUN pip install -c /opt/cvgraph/requirements.lock \
        opencv-python-headless \
        pillow \
        numpy \
        pyarrow \
        pyyaml \
        boto3 \
        onnxruntime

# The workloads package is self-contained (it imports nothing else of cvgraph and no dagster).
WORKDIR /opt/cvgraph
COPY workloads/ /opt/cvgraph/workloads/
RUN python -m compileall -q /opt/cvgraph/workloads \
    && groupadd --gid 10001 cvgraph \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin cvgraph

# Non-root: the worker needs nothing but its task credentials and a writable /tmp (pack spool).
USER 10001:10001

# No HEALTHCHECK: each container runs one task and exits; Batch judges it by its exit code.
# checkov:skip=CKV_DOCKER_2: a batch container that exits when done; Batch judges it by its exit code
CMD ["python", "-m", "workloads.images", "--help"]
