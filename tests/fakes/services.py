"""The real services some tests need (PostgreSQL on 127.0.0.1:5432), and what to do without them.

Without the service a test skips, saying why; with ``CAR_REQUIRE_SERVICES=1`` (``.ci/run`` sets it)
it fails instead, so CI cannot pass by skipping. The root conftest takes every ``CAR_*`` variable
out of the environment for the run and keeps it in ``LIVE_KEYS``, so both places are read.

One database per test run, ``car_test_<random>``, created on first use and dropped (``WITH
(FORCE)``: stores a test left open must not keep it alive) when the process exits. Each test gets
a schema of its own in it (``search_path`` in the URL), so tests start from an empty store.
"""

from __future__ import annotations

import atexit
import os
import uuid
from urllib.parse import quote

import pytest

from .live_keys import LIVE_KEYS

__all__ = ["postgres_schema_url", "require_services", "service_missing"]

# Overridable for a developer whose PostgreSQL listens elsewhere.
ADMIN_URL = os.environ.get("CAR_TEST_POSTGRES_URL") or LIVE_KEYS.get(
    "CAR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

_database: str | None = None
_unreachable: str | None = None


def require_services() -> bool:
    value = os.environ.get("CAR_REQUIRE_SERVICES") or LIVE_KEYS.get("CAR_REQUIRE_SERVICES", "")
    return value.strip().lower() in ("1", "true", "yes")


def service_missing(reason: str) -> None:
    """Skip the test, or fail it when the run requires the services."""
    if require_services():
        pytest.fail(f"{reason} (CAR_REQUIRE_SERVICES=1: services are required)", pytrace=False)
    pytest.skip(reason)


def _with_database(url: str, database: str, schema: str | None = None) -> str:
    base = url.rsplit("/", 1)[0] + "/" + database
    return base + (f"?options={quote(f'-csearch_path={schema}')}" if schema else "")


def _test_database() -> str:
    """The run's database (created on first call), or a skip/fail when PostgreSQL is not there."""
    global _database, _unreachable
    if _database is not None:
        return _database
    if _unreachable is None:
        try:
            import psycopg
        except ImportError:
            _unreachable = "psycopg is not installed (pip install 'car-inference[postgres]')"
        else:
            name = f"car_test_{uuid.uuid4().hex[:12]}"
            try:
                with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
                    admin.execute(f"CREATE DATABASE {name}")
            except psycopg.Error as exc:
                first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                _unreachable = f"PostgreSQL is not reachable at {ADMIN_URL}: {first_line}"
            else:
                _database = name
                atexit.register(_drop, name)
                return name
    service_missing(_unreachable or "PostgreSQL is not reachable")
    raise AssertionError("unreachable")  # service_missing raised


def _drop(name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except psycopg.Error:
        pass  # the server went away first: nothing left to clean here


def postgres_schema_url() -> str:
    """A URL to an empty schema of its own in the run's test database."""
    import psycopg

    database = _test_database()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_with_database(ADMIN_URL, database), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return _with_database(ADMIN_URL, database, schema)
