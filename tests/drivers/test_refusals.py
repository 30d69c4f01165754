"""Refusals at the client cap as PostgreSQL gives them, through libpq as psycopg 3 uses
it: with libpq's default sslmode=prefer the client reads "sorry, too many clients
already" (the proxy answers the SSLRequest first, and libpq drops an error sent in
reply to one), and a client at the cap can still cancel its own query."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest

from conftest import _proxy_bin, free_port, wait_port


@pytest.fixture
def capped_proxy(pg, tmp_path):
    """A pgsidecar with limits.max_client_conn = 1 (trust, transaction mode)."""
    port = free_port()
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"admin_listen: 127.0.0.1:{free_port()}\n"
        f"upstream:\n  host: 127.0.0.1\n  port: {pg.port}\n  tls:\n    sslmode: disable\n"
        "auth:\n  method: trust\n"
        "limits:\n  max_client_conn: 1\n"
    )
    log = tmp_path / "pgsidecar.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(_proxy_bin()), "--config", str(cfg)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, 20, proc, log)
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10"
    finally:
        proc.kill()
        proc.wait(10)


def test_too_many_clients_reads_as_postgresql_with_sslmode_prefer(capped_proxy):
    with psycopg.connect(capped_proxy, sslmode="prefer") as held:
        held.execute("select 1")
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(capped_proxy, sslmode="prefer")
        text = str(e.value)
        assert "sorry, too many clients already" in text, text
        assert "SSL exchange" not in text, text


def test_cancel_is_served_at_the_client_cap(capped_proxy):
    with psycopg.connect(capped_proxy, autocommit=True) as conn:
        def cancel_soon():
            time.sleep(0.5)
            conn.cancel_safe()

        t = threading.Thread(target=cancel_soon)
        t.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        t.join()
        assert time.monotonic() - started < 10
        assert conn.execute("select 1").fetchone() == (1,)
