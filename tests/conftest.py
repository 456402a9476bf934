"""Shared fixtures: settings, a frozen clock, SQLite and PostgreSQL databases, the running
gateway on a free loopback port, and the capture relay (tests/support/relay.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import Engine

from gateway.clock import FrozenClock
from gateway.settings import Settings, load_settings
from gateway.store.db import make_engine, open_database
from tests.support.relay import CaptureRelay

RULES = Path(__file__).parent / "support" / "rules"
PG_URL = os.environ.get("GATEWAY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    """Temporary folders (tmp_path: the SQLite databases and spools) on a RAM file system
    when the machine has one: SQLite runs with synchronous=FULL (docs/design.md §2), so
    every commit waits for an fsync, which on a shared disk costs the suite minutes and
    proves nothing that a process kill (the crash the tests make) does not. Only where no
    folder was chosen (`--basetemp`, PYTEST_DEBUG_TEMPROOT, TMPDIR); with pytest-xdist the
    controller picks it and the workers get their folders inside it."""
    if config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or "TMPDIR" in os.environ:
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(shm)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` (a real daemon, a corpus, the simulated week: seconds each) go to
    the workers first, so none of them starts last and runs alone while the other cores
    idle; the order is otherwise unchanged."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def clock() -> FrozenClock:
    # A Monday, 09:00 UTC (10:00 in Berlin): inside business hours.
    return FrozenClock(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))


def make_settings(tmp_path: Path, **extra: object) -> Settings:
    overrides: dict[str, object] = {
        "rules_dir": str(RULES),
        "smtp": {
            "listen": "127.0.0.1:0",
            "hostname": "mx.example.com",
            "domains": ["example.com", "localhost"],
            "min_free_disk": 0,
        },
        "storage": {
            "database_url": f"sqlite:///{tmp_path}/gateway.db",
            "spool_dir": str(tmp_path / "spool"),
        },
        "outbound": {"relay": "127.0.0.1:9", "from_address": "support@example.com"},
        "security": {"secret_key": "test-secret-key-0123456789abcdef"},
    }
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(overrides.get(section), dict):
            overrides[section] = {**overrides[section], **values}  # type: ignore[dict-item]
        else:
            overrides[section] = values
    old = os.environ.pop("GATEWAY_CONFIG", None)
    try:
        return load_settings(str(_empty_config(tmp_path)), **overrides)
    finally:
        if old is not None:
            os.environ["GATEWAY_CONFIG"] = old


def _empty_config(tmp_path: Path) -> Path:
    p = tmp_path / "config.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        p.write_text("# test config: everything comes from overrides\n")
    return p


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def _pg_admin() -> psycopg.Connection[Any]:
    base = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(base, autocommit=True, connect_timeout=3)
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")


def _pg_url(name: str) -> str:
    return PG_URL.rsplit("/", 1)[0] + "/" + name


def _pg_database(template: str | None = None) -> Iterator[str]:
    """A database of its own for one test (a fresh name, so parallel workers never meet),
    dropped afterwards; empty unless copied from `template`."""
    admin = _pg_admin()
    name = f"gw_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield _pg_url(name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_migrated_template() -> Iterator[str]:
    """One database per test process migrated to the head revision, which the tests that
    want a migrated database copy (CREATE DATABASE ... TEMPLATE) instead of running every
    migration again: about a second less per test. Tests of the migrations themselves
    (first starts, concurrent upgrades) keep using `_pg_database()`, which is empty."""
    database = _pg_database()
    url = next(database)
    try:
        open_database(url).dispose()  # no session may stay connected to a template
        yield url.rsplit("/", 1)[1]
    finally:
        database.close()  # dropped


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An empty PostgreSQL database of this test's own (`_pg_database`)."""
    yield from _pg_database()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """The gateway's engine (`make_engine`: its pool and checkout check) on `pg_url`,
    unmigrated."""
    e = make_engine(pg_url)
    yield e
    e.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Run the test once against SQLite and once against PostgreSQL (a copy of the
    migrated template: what `open_database()` would have made of an empty one)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
    else:
        yield from _pg_database(request.getfixturevalue("pg_migrated_template"))


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = open_database(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
async def relay() -> AsyncIterator[CaptureRelay]:
    async with CaptureRelay() as r:
        yield r
