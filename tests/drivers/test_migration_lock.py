"""Migration-style deploys in transaction mode: what Flyway, Liquibase, golang-migrate,
Prisma Migrate and Rails do, written by hand - a session advisory lock around DDL run as
separate transactions, two deployers at once, while the application keeps querying
through the same pool of 2. The lock must serialise the deployers (each migration runs
exactly once), stay with its owner across transactions, and never outlive it: a
deployer killed while holding it does not stall the next deploy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import asyncpg
import psycopg
import pytest

LOCK_KEY = 7_260_315
POOL = 2
MIGRATIONS = [
    "CREATE TABLE IF NOT EXISTS {t}_widgets (id int PRIMARY KEY)",
    "ALTER TABLE {t}_widgets ADD COLUMN IF NOT EXISTS name text",
    "CREATE INDEX IF NOT EXISTS {t}_widgets_name ON {t}_widgets (name)",
]


@pytest.fixture
def mig_proxy(proxy_factory):
    return proxy_factory.get("transaction", POOL, db="state")


def _reset(proxy, prefix):
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {prefix}_widgets, {prefix}_schema_migrations")
        c.execute(f"CREATE TABLE {prefix}_schema_migrations (version int PRIMARY KEY, pid int, at timestamptz DEFAULT now())")


def _advisory_locks(direct, dbname):
    with psycopg.connect(direct(dbname), autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
            (LOCK_KEY,),
        ).fetchone()[0]


def _psycopg_deploy(dsn, prefix, hold=0.0):
    """One deployer: lock, apply what is missing (each its own transaction), unlock."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            for version, sql in enumerate(MIGRATIONS, 1):
                done = c.execute(f"SELECT 1 FROM {prefix}_schema_migrations WHERE version = %s", (version,)).fetchone()
                if done:
                    continue
                with c.transaction():
                    c.execute(sql.format(t=prefix))
                    c.execute(
                        f"INSERT INTO {prefix}_schema_migrations (version, pid) VALUES (%s, pg_backend_pid())",
                        (version,),
                    )
                time.sleep(hold)
        finally:
            c.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


async def _asyncpg_deploy(url, prefix, hold=0.0):
    c = await asyncpg.connect(url, timeout=15, command_timeout=30)
    try:
        await c.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            for version, sql in enumerate(MIGRATIONS, 1):
                if await c.fetchval(f"SELECT 1 FROM {prefix}_schema_migrations WHERE version = $1", version):
                    continue
                async with c.transaction():
                    await c.execute(sql.format(t=prefix))
                    await c.execute(
                        f"INSERT INTO {prefix}_schema_migrations (version, pid) VALUES ($1, pg_backend_pid())",
                        version,
                    )
                await asyncio.sleep(hold)
        finally:
            await c.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await c.close()


def _app_traffic(proxy, stop_at):
    """The application meanwhile: short transactions through the same pool."""
    n = 0
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        while time.monotonic() < stop_at:
            assert c.execute("SELECT 1").fetchone()[0] == 1
            n += 1
    return n


def _check_applied_once(proxy, prefix):
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        rows = c.execute(f"SELECT version FROM {prefix}_schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [1, 2, 3]
        c.execute(f"INSERT INTO {prefix}_widgets (id, name) VALUES (1, 'x')")


def test_psycopg_two_deployers_serialise(mig_proxy, direct):
    _reset(mig_proxy, "mpg")
    import threading

    errors = []

    def run():
        try:
            _psycopg_deploy(mig_proxy.dsn(), "mpg", hold=0.1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    deployers = [threading.Thread(target=run) for _ in range(2)]
    for t in deployers:
        t.start()
    served = _app_traffic(mig_proxy, time.monotonic() + 1.0)
    for t in deployers:
        t.join(30)
    assert not errors, errors
    assert served > 0
    _check_applied_once(mig_proxy, "mpg")
    assert _advisory_locks(direct, mig_proxy.dbname) == 0


async def test_asyncpg_two_deployers_serialise(mig_proxy, direct):
    _reset(mig_proxy, "mapg")
    await asyncio.wait_for(
        asyncio.gather(*(_asyncpg_deploy(mig_proxy.url(), "mapg", hold=0.1) for _ in range(2))),
        30,
    )
    _check_applied_once(mig_proxy, "mapg")
    assert _advisory_locks(direct, mig_proxy.dbname) == 0


KILLED_DEPLOYER = """
import sys, time, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
c.execute("SELECT pg_advisory_lock(%s)", (int(sys.argv[2]),))
print("locked", flush=True)
time.sleep(60)
"""


def test_killed_deployer_does_not_stall_the_next_deploy(mig_proxy, direct):
    _reset(mig_proxy, "mkill")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DEPLOYER, mig_proxy.dsn(), str(LOCK_KEY)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert _advisory_locks(direct, mig_proxy.dbname) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        while _advisory_locks(direct, mig_proxy.dbname) and time.monotonic() - t0 < 1.0:
            time.sleep(0.02)
        assert _advisory_locks(direct, mig_proxy.dbname) == 0, "lock outlived the killed client by 1 s"
    finally:
        if proc.poll() is None:
            proc.kill()
    asyncio.run(asyncio.wait_for(_asyncpg_deploy(mig_proxy.url(), "mkill"), 10))
    _check_applied_once(mig_proxy, "mkill")
