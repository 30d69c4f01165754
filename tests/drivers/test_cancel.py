"""Query cancellation through the proxy.

PostgreSQL closes a CancelRequest connection only after it has signalled the backend
(and it signals twice: kill(pid) and kill(-pid)). Drivers rely on that EOF: libpq's
PQcancel/PQcancelBlocking and asyncpg wait for it before they send the next command, so
that a late cancel cannot zap the next statement. A proxy has to keep that contract:
close the client's cancel connection only after the server closed the forwarded one,
and (transaction mode) not hand the server to another client while a cancel to it is
still in flight.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as E

from conftest import Proxy, free_port, wait_port

CANCEL_CODE = 80877102
UPSTREAM_CANCEL_DELAY = 0.5


class CancelDelayRelay:
    """TCP relay in front of PostgreSQL that holds every CancelRequest for
    UPSTREAM_CANCEL_DELAY seconds before passing it on (a slow network to the server)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.cancels = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.thread.start()
        self.ready.wait(10)
        wait_port(self.port, 10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        up_w = None
        try:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            if length == 16 and code == CANCEL_CODE:
                head += await reader.readexactly(8)
                self.cancels += 1
                await asyncio.sleep(UPSTREAM_CANCEL_DELAY)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_w.write(head)

            async def pump(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()
            if up_w is not None:
                up_w.close()

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


@pytest.fixture(scope="module")
def cancel_relay(pg):
    relay = CancelDelayRelay(pg.port)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def relay_proxies(pg, cancel_relay):
    """pgsidecar per mode whose upstream is the relay."""
    made = {}

    def get(mode):
        if mode not in made:
            p = Proxy(mode=mode, pool_size=2, upstream_port=cancel_relay.port, logdir=pg.base,
                      dbname=pg.databases[mode])
            p.start()
            made[mode] = p
        return made[mode].ensure()

    yield get
    for p in made.values():
        p.kill()


@pytest.mark.parametrize("target", ["direct", "transaction", "session"])
def test_cancel_acknowledged_only_after_delivery(request, pg, cancel_relay, relay_proxies, target):
    """libpq contract: when PQcancel(Blocking) returns, the server has processed the cancel.
    Control case `direct`: libpq -> relay -> PostgreSQL, no proxy. Regression test: before
    d45097e the proxy closed the client's cancel connection first and forwarded after, so
    cancel_safe() returned after ~0.002 s and the statement ended ~0.51 s later."""
    if target == "direct":
        dsn = f"host=127.0.0.1 port={cancel_relay.port} user=postgres dbname=drv_transaction connect_timeout=10"
    else:
        dsn = relay_proxies(target).dsn()
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(pg.dsn(), autocommit=True) as watch:
        tag = f"cancel-probe-{target}-{time.monotonic_ns()}"
        ended = {}

        def run():
            try:
                conn.execute(f"SELECT pg_sleep(10) /* {tag} */")
            except E.QueryCanceled:
                ended["at"] = time.monotonic()
            except Exception as e:  # noqa: BLE001
                ended["error"] = e

        th = threading.Thread(target=run, daemon=True)
        th.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if watch.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                             (f"%{tag}%",)).fetchone()[0]:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the sleeping statement never showed up in pg_stat_activity")
        t0 = time.monotonic()
        conn.cancel_safe(timeout=10)
        returned = time.monotonic()
        th.join(10)
        assert "error" not in ended, ended.get("error")
        assert "at" in ended, "statement was not cancelled"
        lag = ended["at"] - returned
        assert lag < UPSTREAM_CANCEL_DELAY / 2, (
            f"cancel_safe() returned after {returned - t0:.3f}s but the statement was only cancelled "
            f"{lag:.3f}s later: the cancel connection was closed before the server processed it")


STRAY_MODES = [("transaction", 1), ("session", 2)]


@pytest.mark.parametrize("mode,size", STRAY_MODES, ids=[m for m, _ in STRAY_MODES])
async def test_asyncpg_timeouts_cancel_nothing_else(proxy_factory, mode, size):
    """Client A times out (asyncpg timeout= -> CancelRequest) over and over while client B
    runs short statements. Directly on PostgreSQL neither ever sees a stray
    QueryCanceledError. Regression test (racy by nature): before d45097e, A's following
    pg_sleep was cancelled within 1 ms (session mode, 2-5 in 40) and B's statements were
    cancelled by A's cancels (transaction mode, pool size 1: 3-10 per ~40)."""
    proxy = proxy_factory.get(mode, size, db="state")
    a = await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30)
    b = await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30)
    stray_a, stray_b, b_done = [], [], 0
    stop = asyncio.Event()

    async def b_loop():
        nonlocal b_done
        while not stop.is_set():
            try:
                await b.fetchval("SELECT pg_sleep(0.002)")
                b_done += 1
            except asyncpg.QueryCanceledError as e:
                stray_b.append(str(e))

    bt = asyncio.create_task(b_loop())
    try:
        for i in range(25):
            try:
                await a.fetchval("SELECT pg_sleep(5)", timeout=0.2)
                stray_a.append(f"{i}: no timeout")
            except asyncio.TimeoutError:
                pass
            except asyncpg.QueryCanceledError:
                stray_a.append(f"{i}: cancelled before its own timeout")
    finally:
        stop.set()
        await bt
        await a.close()
        await b.close()
    assert b_done > 0
    assert not stray_a and not stray_b, f"client A: {stray_a}; client B: {len(stray_b)} cancelled statements"
