"""The admin API tests reuse the config store tests' PostgreSQL fixtures (a fresh database per test)."""

from tests.store.conftest import pg_database, pg_server  # noqa: F401 (fixtures, found by name)
