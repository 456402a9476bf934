"""`gateway doctor` on the database's upkeep (gateway/doctor.py `check_database_upkeep`):
PostgreSQL without autovacuum (or without the statistics it runs on) is a warning with a
fix; SQLite has nothing to check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.doctor import check_database_upkeep, upkeep_check
from tests.conftest import _pg_admin, _pg_database, make_settings


def test_sqlite_has_no_upkeep_to_check(tmp_path: Path) -> None:
    """A SQLite installation gets no upkeep check at all (not even an "ok" line)."""
    assert check_database_upkeep(make_settings(tmp_path)) == []


@pytest.mark.parametrize(
    ("autovacuum", "track_counts"), [("on", "off"), ("off", "on"), ("off", "off")]
)
def test_a_server_without_autovacuum_or_its_counts_is_warned_about(
    autovacuum: str, track_counts: str
) -> None:
    """Either setting off is a warning that shows both values and whose fix names
    autovacuum (and the manual alternative)."""
    check = upkeep_check(autovacuum, track_counts)
    assert check.name == "database upkeep"
    assert check.status == "warn"
    assert f"autovacuum = {autovacuum}" in check.detail
    assert f"track_counts = {track_counts}" in check.detail
    assert "autovacuum = on" in check.fix
    assert "VACUUM ANALYZE" in check.fix


def test_a_server_with_both_on_is_ok() -> None:
    """Both on (PostgreSQL's defaults): ok, nothing to fix."""
    check = upkeep_check("on", "on")
    assert (check.name, check.status, check.fix) == ("database upkeep", "ok", "")


@pytest.fixture
def pg_url(pg_migrated_template: str) -> Iterator[str]:
    yield from _pg_database(pg_migrated_template)


def _server_says(url: str) -> tuple[str, str]:
    """What the server says of the two settings, asked through psycopg directly."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        autovacuum = conn.execute("SHOW autovacuum").fetchone()
        track_counts = conn.execute("SHOW track_counts").fetchone()
    assert autovacuum is not None
    assert track_counts is not None
    return str(autovacuum[0]), str(track_counts[0])


def _agrees(url: str, tmp_path: Path) -> str:
    """Run the check against `url` and assert its verdict is the server's (warn iff either
    setting is not on); return the verdict."""
    [check] = check_database_upkeep(make_settings(tmp_path, storage={"database_url": url}))
    autovacuum, track_counts = _server_says(url)
    expected = "ok" if (autovacuum, track_counts) == ("on", "on") else "warn"
    assert check.status == expected, (check, autovacuum, track_counts)
    if expected == "warn":
        assert "autovacuum" in check.fix
        assert f"track_counts = {track_counts}" in check.detail
    return check.status


@pytest.mark.postgres
def test_the_verdict_on_postgresql_is_the_servers(pg_url: str, tmp_path: Path) -> None:
    """Against the test server as it runs, the check says what `SHOW` says."""
    _agrees(pg_url, tmp_path)


@pytest.mark.postgres
def test_a_database_without_statistics_counts_is_warned_about(pg_url: str, tmp_path: Path) -> None:
    """With track_counts off for the gateway's database (a superuser's setting, which
    starves autovacuum: it has no counts to act on), the check warns on a real server,
    and still agrees with `SHOW`."""
    name = pg_url.rsplit("/", 1)[1]
    admin = _pg_admin()
    try:
        admin.execute(f'ALTER DATABASE "{name}" SET track_counts = off')
    finally:
        admin.close()
    assert _server_says(pg_url)[1] == "off"
    assert _agrees(pg_url, tmp_path) == "warn"
