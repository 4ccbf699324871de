# syntax=docker/dockerfile:1
# cvgraph orchestrator: one image for the three Dagster roles of deploy/cloudformation/
# orchestrator.yaml, each an ECS Fargate task of its own:
#   dagster-webserver -h 0.0.0.0 -p 3000 -w workspace.yaml   (the UI service, behind the load balancer)
#   dagster-daemon run -w workspace.yaml                      (sensors, automation, the run queue)
#   dagster api execute_run ...                               (each run: EcsRunLauncher's command)
# The task definitions give the command; the default is the webserver's.
#
# Build from the repository root, for linux/amd64:
#   docker build --platform linux/amd64 -f deploy/docker/orchestrator.Dockerfile -t cvgraph-orchestrator .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 DAGSTER_HOME=/opt/dagster \
    DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH=256 DAGSTER_EVENT_BATCH_SIZE=1024

# The project and its dependencies at the lock's versions, as `make install` installs them:
# torch first, the CPU build from PyTorch's own index, alone (--no-deps; the orchestrator exports
# and evaluates models, training runs on SageMaker), then the project with the lock as
# constraints, which finds torch in place.
WORKDIR /opt/cvgraph
COPY requirements.lock pyproject.toml workspace.yaml /opt/cvgraph/
COPY cvgraph/ /opt/cvgraph/cvgraph/
COPY orchestration/ /opt/cvgraph/orchestration/
COPY assets/ /opt/cvgraph/assets/
COPY resources/ /opt/cvgraph/resources/
COPY workloads/ /opt/cvgraph/workloads/
COPY partitions/ /opt/cvgraph/partitions/
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
    && pip install -c requirements.lock . \
    && groupadd --gid 10001 cvgraph \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin cvgraph \
    && mkdir -p /opt/dagster && chown 10001:10001 /opt/dagster

# The instance: RDS PostgreSQL storage and the ECS run launcher, every value from the task's
# environment and secrets (deploy/dagster/dagster.yaml).
COPY deploy/dagster/dagster.yaml /opt/dagster/dagster.yaml

USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if os.environ.get('CVGRAPH_ROLE', 'webserver') != 'webserver' or urllib.request.urlopen('http://127.0.0.1:3000/server_info', timeout=4).status == 200 else 1)"]
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
