"""The instance on PostgreSQL: dagster-postgres's run, event log and schedule storages, given a
URL SQLAlchemy reads with psycopg2.

SQLAlchemy 2.1 reads a plain ``postgresql://`` URL with psycopg 3, whose server-side parameters
break dagster-postgres's ``NOTIFY run_events, :id``; dagster-postgres installs psycopg2 only.
So a plain URL (``postgresql://`` or ``postgres://``, as RDS and most tools write it) is read as
``postgresql+psycopg2://``: the same server, the driver dagster-postgres is written for.
``dagster.yaml`` names these classes (``orchestration.instance.storage_yaml``).
"""

from __future__ import annotations

import dagster_postgres as dp
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

PLAIN = ("postgresql://", "postgres://")


def psycopg2_url(url: str) -> str:
    """``url`` with psycopg2 named as its driver when it names none."""
    for plain in PLAIN:
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain) :]
    return url


class _FromConfig:
    """dagster-postgres's ``from_config_value`` builds its own class, with the URL as given."""

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(
            inst_data=inst_data,
            postgres_url=psycopg2_url(pg_url_from_config(config_value)),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )


class PostgresRunStorage(_FromConfig, dp.PostgresRunStorage):
    pass


class PostgresEventLogStorage(_FromConfig, dp.PostgresEventLogStorage):
    pass


class PostgresScheduleStorage(_FromConfig, dp.PostgresScheduleStorage):
    pass
