#!/usr/bin/env bash
# psycopg 3's own test suite as the judge of "indistinguishable from PostgreSQL".
# Not part of tests/run-all.sh: the full suite takes well over 20 minutes for the three
# targets. It fetches nothing: give it a psycopg source checkout (the tests/ folder of the
# tag that matches the installed psycopg) and a Python that has psycopg[binary],
# psycopg-pool, pytest, pytest-asyncio/anyio and the suite's other test requirements.
#
#   PSYCOPG_PY=/path/to/venv/bin/python bash tests/drivers/psycopg_suite.sh /tmp/psycopg [pytest args...]
#
# It starts a throwaway PostgreSQL cluster (trust auth, loopback only), runs the suite
# against it directly, then through pgsidecar in session mode and in transaction mode
# (--pool-size 120), and prints, per mode, the failures that the direct run does not have.
# Results: $OUT (default target/psycopg-suite) holds each run's junit-free summary lines.
# Tests that dial other addresses than 127.0.0.1 are deselected.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
checkout="${1:?usage: psycopg_suite.sh PSYCOPG_CHECKOUT [pytest args...]}"
shift
checkout="$(cd "$checkout" && pwd)"
PY="${PSYCOPG_PY:-$root/target/test-venv/bin/python}"
BIN="${PGSIDECAR_BIN:-$root/target/release/pgsidecar}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
OUT="${OUT:-$root/target/psycopg-suite}"
MODES="${MODES:-direct session transaction}"
mkdir -p "$OUT"
# Absolute: the runs cd into the checkout.
OUT="$(cd "$OUT" && pwd)"
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac
case "$BIN" in /*) ;; */*) BIN="$(pwd)/$BIN" ;; esac

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

base="$(mktemp -d /tmp/psycopg-suite.XXXXXX)"
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$base"; as_pg=(runuser -u postgres --); fi
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$base/data" -m immediate -w stop >/dev/null 2>&1
    rm -rf "$base"
}
trap cleanup EXIT
trap "exit 130" INT TERM

pg_port="$(free_port)"
"${as_pg[@]}" "$PG_BIN/initdb" -D "$base/data" --auth=trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null || exit 2
cat >>"$base/data/postgresql.auto.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$base'
fsync = off
synchronous_commit = off
max_connections = 300
max_prepared_transactions = 10
CONF
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$base/data" -l "$base/pg.log" -w start >/dev/null || exit 2
"$PG_BIN/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres psycopg_test || exit 2

deselect=(
    --deselect tests/test_connection.py::test_connect_error_multi_hosts_each_message_preserved
    --deselect tests/test_connection_async.py::test_connect_error_multi_hosts_each_message_preserved
    --deselect tests/test_connection.py::test_resolve_error_host
    --deselect tests/test_connection_async.py::test_resolve_error_host
)

run() {  # run NAME PORT
    local name="$1" port="$2"
    shift 2
    local dsn="host=127.0.0.1 port=$port user=postgres dbname=psycopg_test"
    echo "==> $name ($dsn)"
    # A fresh cache per run: psycopg's conftest refuses to run after a run it saw crash.
    rm -rf "$OUT/cache-$name"
    (cd "$checkout" && "$PY" -m pytest -q -o cache_dir="$OUT/cache-$name" --test-dsn "$dsn" -m "not mypy" \
        -o addopts="" --timeout=120 "${deselect[@]}" -rfE "$@" >"$OUT/$name.log" 2>&1)
    grep -E '^(FAILED|ERROR) ' "$OUT/$name.log" | sed -E 's/ - .*//' | sort -u >"$OUT/$name.failed"
    tail -1 "$OUT/$name.log"
}

proxy_port=""
start_proxy() {  # start_proxy MODE -> sets proxy_port (not in a subshell: cleanup kills it)
    local mode="$1" admin
    proxy_port="$(free_port)"; admin="$(free_port)"
    NO_COLOR=1 PGSIDECAR_LOG=warn "$BIN" --upstream "postgres://postgres@127.0.0.1:$pg_port/postgres" \
        --listen "127.0.0.1:$proxy_port" --admin-listen "127.0.0.1:$admin" \
        --pool-mode "$mode" --pool-size 120 >"$OUT/proxy-$mode.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && break
        sleep 0.2
    done
}

for m in $MODES; do
    if [ "$m" = direct ]; then
        run direct "$pg_port" "$@"
    else
        start_proxy "$m"
        run "$m" "$proxy_port" "$@"
    fi
done

if [ -f "$OUT/direct.failed" ]; then
    for m in $MODES; do
        [ "$m" = direct ] && continue
        echo "==> failing through $m, passing directly:"
        comm -23 "$OUT/$m.failed" "$OUT/direct.failed"
    done
fi
