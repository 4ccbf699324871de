"""The tracking server's entrypoint (deploy/docker/mlflow.Dockerfile; the ECS service of
deploy/cloudformation/tracking.yaml): ``mlflow server`` with its metadata in PostgreSQL, artifacts
proxied to the lake bucket, and MLflow's basic auth in front.

Configured by the environment the task definition gives it (nothing is read from files):

- ``MLFLOW_DB_HOST``, ``MLFLOW_DB_PORT`` (5432), ``MLFLOW_DB_NAME`` (mlflow), ``MLFLOW_DB_USER``,
  ``MLFLOW_DB_PASSWORD``: the backend store (RDS; the user and password from Secrets Manager).
  ``MLFLOW_BACKEND_STORE_URI``, when set, is used as is instead.
- ``MLFLOW_ARTIFACTS_DESTINATION``: where artifacts go (``s3://bucket/prefix/mlflow``); clients
  send them through the server (``mlflow-artifacts:/``), so only the server's role reaches S3.
- ``MLFLOW_AUTH_ADMIN_USERNAME`` (admin), ``MLFLOW_AUTH_ADMIN_PASSWORD``: the admin user made on
  first start (MLflow reads both itself); the password generated into Secrets Manager.
- ``MLFLOW_FLASK_SERVER_SECRET_KEY``: the auth app's CSRF key (MLflow reads it itself), one for
  every task of the service, so from Secrets Manager too.
- ``MLFLOW_HOST`` (0.0.0.0), ``MLFLOW_PORT`` (5000), ``MLFLOW_WORKERS`` (2),
  ``MLFLOW_SERVER_ALLOWED_HOSTS`` (MLflow's own: the load balancer's name).

The user store of the auth app lives in the same database (its own tables and migration table,
``alembic_version_auth``). Runs with the standard library only, before exec'ing mlflow."""

from __future__ import annotations

import os
import sys
import tempfile
from urllib.parse import quote


def backend_store_uri(environ: dict[str, str]) -> str:
    """The PostgreSQL URI of the backend store, its user and password URL-quoted."""
    if environ.get("MLFLOW_BACKEND_STORE_URI"):
        return environ["MLFLOW_BACKEND_STORE_URI"]
    missing = [
        n for n in ("MLFLOW_DB_HOST", "MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD") if not environ.get(n)
    ]
    if missing:
        raise SystemExit(f"tracking server: {', '.join(missing)} not set")
    user, password = (
        quote(environ["MLFLOW_DB_USER"], safe=""),
        quote(environ["MLFLOW_DB_PASSWORD"], safe=""),
    )
    host, port = environ["MLFLOW_DB_HOST"], environ.get("MLFLOW_DB_PORT") or "5432"
    name = environ.get("MLFLOW_DB_NAME") or "mlflow"
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{name}"


def auth_config(store_uri: str, directory: str) -> str:
    """Write the basic-auth app's configuration (its user store: ``store_uri``); returns its path.
    Every request needs a user the admin made; a user reads what no permission was granted on
    (``default_permission = READ``) and writes what they made."""
    path = os.path.join(directory, "basic_auth.ini")
    # configparser interpolates '%': a quoted password's %XX must be written as %%XX
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {store_uri.replace('%', '%%')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
    return path


def command(environ: dict[str, str]) -> list[str]:
    """The ``mlflow server`` command line."""
    destination = environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    if not destination:
        raise SystemExit("tracking server: MLFLOW_ARTIFACTS_DESTINATION not set")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if not environ.get(name):
            raise SystemExit(f"tracking server: {name} not set")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        backend_store_uri(environ),
        "--artifacts-destination",
        destination,
        "--host",
        environ.get("MLFLOW_HOST") or "0.0.0.0",
        "--port",
        environ.get("MLFLOW_PORT") or "5000",
        "--workers",
        environ.get("MLFLOW_WORKERS") or "2",
    ]


def main() -> None:
    argv = command(os.environ)
    store = argv[argv.index("--backend-store-uri") + 1]
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = auth_config(
        store, tempfile.mkdtemp(prefix="mlflow-auth-")
    )
    os.environ.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
