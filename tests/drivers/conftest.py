"""Fixtures for the pgsidecar driver compatibility suite.

* ``pg``      - one throwaway PostgreSQL 15 cluster per pytest session (trust auth,
                fsync=off), with one database per proxy mode so tests of the two modes
                never see each other's tables.
* ``proxy``   - a pgsidecar process in front of it, parametrized over
                ``transaction`` and ``session`` mode (pool size 5).
* ``tx_proxy`` / ``session_proxy`` - the same, for tests that only make sense in one mode.
* ``proxy_factory`` - any (mode, pool size) combination, started once and cached.

Everything started here is stopped at the end of the session, also on failure, and
(by an atexit hook) also when the interpreter exits abnormally.

A per-test watchdog kills the proxies if a test overruns its hard limit: a test blocked
in a C-level socket read (psycopg2, libpq) cannot be interrupted by pytest-timeout's
signal, but it gets an error once the proxy's socket closes. Killed proxies are restarted
on the same port the next time a fixture asks for them.

Environment:
  PG_BIN              directory with initdb/pg_ctl (default: /usr/lib/postgresql/15/bin,
                      then `pg_config --bindir`)
  PGSIDECAR_BIN       proxy binary (default: <repo>/target/release/pgsidecar)
  PGSIDECAR_DRIVERS_KEEP=1  keep the temp dir (cluster + proxy logs) afterwards
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = ("transaction", "session")
DEFAULT_POOL_SIZE = 5
# Hard per-test limit enforced by killing the proxies (pytest-timeout's own limit, from
# pytest.ini, is lower and fires first whenever Python code gets control back).
WATCHDOG_SECONDS = float(os.environ.get("PGSIDECAR_DRIVERS_WATCHDOG", "100"))

_cleanups: list = []


def _run_cleanups() -> None:
    while _cleanups:
        fn = _cleanups.pop()
        with contextlib.suppress(Exception):
            fn()


atexit.register(_run_cleanups)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not accept connections within {timeout}s")


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def _pg_bindir() -> Path:
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@dataclass
class PgCluster:
    bindir: Path
    base: Path
    port: int = 0
    as_postgres: bool = False
    databases: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(a) for a in args]
        return (["runuser", "-u", "postgres", "--"] + cmd) if self.as_postgres else cmd

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def init(self) -> None:
        self._run(self.bindir / "initdb", "-D", self.data, "--auth=trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", "--locale=C", timeout=120)

    def start(self) -> None:
        last = ""
        for _ in range(8):
            self.port = free_port()
            conf = (
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 64MB\n"
                "log_min_messages = warning\n"
            )
            conf_path = self.data / "postgresql.auto.conf"
            conf_path.write_text(conf)
            if self.as_postgres:
                shutil.chown(conf_path, "postgres", "postgres")
            res = subprocess.run(
                self._cmd(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start"),
                capture_output=True, text=True, timeout=90)
            if res.returncode == 0:
                wait_port(self.port, 30)
                return
            last = res.stdout + res.stderr + (self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "")
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"could not start PostgreSQL:\n{last}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._cmd(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                           capture_output=True, timeout=60)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"


@pytest.fixture(scope="session")
def pg():
    bindir = _pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="pgsidecar-drivers-"))
    as_postgres = os.geteuid() == 0
    if as_postgres:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    cluster = PgCluster(bindir=bindir, base=base, as_postgres=as_postgres)
    keep = os.environ.get("PGSIDECAR_DRIVERS_KEEP") == "1"

    def cleanup():
        cluster.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)

    _cleanups.append(cleanup)
    try:
        cluster.init()
        cluster.start()
        import psycopg

        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            for mode in MODES + ("state",):
                conn.execute(f"CREATE DATABASE drv_{mode}")
                cluster.databases[mode] = f"drv_{mode}"
        yield cluster
    finally:
        if cleanup in _cleanups:
            _cleanups.remove(cleanup)
        cleanup()


# ---------------------------------------------------------------------------
# pgsidecar
# ---------------------------------------------------------------------------


def _proxy_bin() -> Path:
    p = Path(os.environ.get("PGSIDECAR_BIN", REPO_ROOT / "target" / "release" / "pgsidecar"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


@dataclass
class Proxy:
    mode: str
    pool_size: int
    upstream_port: int
    logdir: Path
    port: int = 0
    admin_port: int = 0
    proc: subprocess.Popen | None = None
    dbname: str = "postgres"
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.logdir / f"pgsidecar-{self.mode}-{self.pool_size}.log"

    def start(self) -> None:
        binary = _proxy_bin()
        if not binary.exists():
            pytest.exit(f"pgsidecar binary not found at {binary}: run `cargo build --release` "
                        "or set PGSIDECAR_BIN", returncode=3)
        keep_ports = self.port != 0
        last = None
        for _ in range(5):
            if not keep_ports:
                self.port, self.admin_port = free_port(), free_port()
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen(
                [str(binary),
                 "--upstream", f"postgres://postgres@127.0.0.1:{self.upstream_port}/postgres",
                 "--listen", f"127.0.0.1:{self.port}",
                 "--admin-listen", f"127.0.0.1:{self.admin_port}",
                 "--pool-mode", self.mode,
                 "--pool-size", str(self.pool_size)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)
            logf.close()
            self.starts += 1
            try:
                wait_port(self.port, 20, self.proc, self.log)
                return
            except (RuntimeError, TimeoutError) as e:  # port taken meanwhile: try others
                last = e
                self.kill()
                if keep_ports:
                    time.sleep(0.5)
        raise RuntimeError(f"pgsidecar did not start: {last}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> "Proxy":
        if not self.alive():
            self.start()
        return self

    def kill(self) -> None:
        # SIGKILL, not SIGTERM: on SIGTERM pgsidecar drains gracefully (keeps accepting
        # for a few seconds), which a throwaway test proxy does not need.
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def hard_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    # connection strings ----------------------------------------------------

    def dsn(self, dbname: str | None = None, **extra) -> str:
        """libpq keyword/value string (psycopg 3, psycopg2)."""
        parts = {
            "host": "127.0.0.1", "port": self.port, "user": "postgres",
            "dbname": dbname or self.dbname, "connect_timeout": 10,
        }
        parts.update(extra)
        out = []
        for k, v in parts.items():
            v = str(v)
            if " " in v or "'" in v or v == "":
                v = "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
            out.append(f"{k}={v}")
        return " ".join(out)

    def url(self, dbname: str | None = None) -> str:
        """URL form (asyncpg)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname or self.dbname}"

    def __repr__(self) -> str:
        return f"Proxy({self.mode}, pool={self.pool_size}, port={self.port})"


class ProxyFactory:
    def __init__(self, pg: PgCluster, logdir: Path):
        self.pg = pg
        self.logdir = logdir
        self.proxies: dict[tuple[str, int, str], Proxy] = {}

    def get(self, mode: str, pool_size: int = DEFAULT_POOL_SIZE, db: str | None = None) -> Proxy:
        db = db or mode
        key = (mode, pool_size, db)
        p = self.proxies.get(key)
        if p is None:
            p = Proxy(mode=mode, pool_size=pool_size, upstream_port=self.pg.port, logdir=self.logdir,
                      dbname=self.pg.databases[db])
            self.proxies[key] = p
        return p.ensure()

    def kill_all(self, hard: bool = False) -> None:
        for p in self.proxies.values():
            (p.hard_kill if hard else p.kill)()


@pytest.fixture(scope="session")
def proxy_factory(pg):
    factory = ProxyFactory(pg, pg.base)
    _cleanups.append(factory.kill_all)
    try:
        yield factory
    finally:
        if factory.kill_all in _cleanups:
            _cleanups.remove(factory.kill_all)
        factory.kill_all()


@pytest.fixture(params=MODES)
def proxy(request, proxy_factory) -> Proxy:
    """The proxy in each pool mode, pool size 5, database drv_<mode>."""
    return proxy_factory.get(request.param)


@pytest.fixture
def tx_proxy(proxy_factory) -> Proxy:
    return proxy_factory.get("transaction")


@pytest.fixture
def session_proxy(proxy_factory) -> Proxy:
    return proxy_factory.get("session")


@pytest.fixture
def direct(pg):
    """A factory of libpq connection strings straight to PostgreSQL (for checks)."""
    return pg.dsn


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Kills the proxies if a test runs past WATCHDOG_SECONDS (see module doc)."""
    factory = None
    if "proxy_factory" in request.fixturenames:
        factory = request.getfixturevalue("proxy_factory")
    fired = threading.Event()

    def fire():
        fired.set()
        if factory is not None:
            factory.kill_all(hard=True)

    t = threading.Timer(WATCHDOG_SECONDS, fire)
    t.daemon = True
    t.start()
    yield
    t.cancel()
    if fired.is_set():
        pytest.fail(f"watchdog: test ran over {WATCHDOG_SECONDS}s; proxies were killed", pytrace=False)


def _item_mode(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for v in callspec.params.values():
        if isinstance(v, str) and v in MODES:
            return v
        if isinstance(v, tuple) and v and v[0] in MODES:
            return v[0]
    return None


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.proxy_bug(modes=(...), reason=..., strict=True)`: a reproduction of a
    pgsidecar bug this suite found. It runs as xfail(strict=True) in the listed modes
    (default: both), so CI stays green while the bug is open and turns red (XPASS strict)
    once it is fixed - then drop the marker. Racy reproductions use strict=False. `--runxfail` (or PGSIDECAR_DRIVERS_BUGS=fail) shows the plain failures."""
    if os.environ.get("PGSIDECAR_DRIVERS_BUGS") == "fail":
        return
    for item in items:
        m = item.get_closest_marker("proxy_bug")
        if m is None:
            continue
        modes = m.kwargs.get("modes")
        mode = _item_mode(item)
        if (modes is None and mode is None) or (mode is not None and mode in (modes or MODES)):
            item.add_marker(pytest.mark.xfail(strict=m.kwargs.get("strict", True),
                                              reason="pgsidecar bug: " + m.kwargs.get("reason", "")))


def pytest_report_header(config):
    return [f"pgsidecar binary: {_proxy_bin()}", f"PostgreSQL bindir: {_pg_bindir()}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of the proxy logs to the report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when in ("call", "setup"):
        factory = getattr(item, "funcargs", {}).get("proxy_factory")
        if factory is None:
            return
        for p in factory.proxies.values():
            if p.log.exists():
                tail = p.log.read_text(errors="replace").splitlines()[-30:]
                rep.sections.append((f"{p!r} log tail", "\n".join(tail)))
