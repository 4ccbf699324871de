# syntax=docker/dockerfile:1
# cvgraph tracking server: `mlflow server` with its metadata in PostgreSQL, its artifacts proxied
# to the lake bucket and MLflow's basic auth in front, as the ECS service of
# deploy/cloudformation/tracking.yaml runs it. deploy/mlflow/serve.py builds the command line from
# the task's environment and secrets (nothing is read from files) and execs it.
#
# Build from the repository root, for linux/amd64 (the task definition's RuntimePlatform):
#   docker build --platform linux/amd64 -f deploy/docker/mlflow.Dockerfile -t cvgraph-mlflow .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the server needs, at the versions of requirements.lock (the lock the test suite's venv
# is installed from, used as constraints: it pins their dependencies too): mlflow with the auth
# app's extra (Flask-WTF), psycopg2 for the PostgreSQL backend store, boto3 for the S3 artifacts.
# Not the project: the server imports nothing of cvgraph. tests/deploy/test_tracking_stack.py
# checks this list against the lock.
COPY requirements.lock /opt/mlflow/requirements.lock
RUN pip install -c /opt/mlflow/requirements.lock \
        "mlflow[auth]" \
        psycopg2-binary \
        boto3 \
    && groupadd --gid 10001 mlflow \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mlflow

COPY deploy/mlflow/serve.py /app/serve.py

# Non-root: the server needs its task credentials, the database and a writable /tmp (the auth
# app's configuration file, artifacts in transit).
USER 10001:10001
EXPOSE 5000
# /health answers without auth and whatever the Host header.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
# CMD, not ENTRYPOINT: an ECS run-task override (a schema upgrade, README) replaces it whole.
CMD ["python", "/app/serve.py"]
