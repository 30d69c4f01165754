#!/usr/bin/env bash
# What the pool's controllers give real loads, against direct PostgreSQL and PgBouncer in
# one run on one throwaway cluster (PostgreSQL logs every login: log_connections = on):
#
#   low rate     one client at 1 and 6.67 transactions a second (pgbench -R, Poisson
#                arrivals), and pgbench -S -R 20 -c 2: server logins each caused, and
#                p50/p99 latency (pool size 8, stock settings otherwise)
#   saturation   pool size 5, 10 clients of `select pg_sleep(0.2)`: tps against the
#                physical 25, pgsidecar with congestion control on (default) and off
#   select-c64   pgbench -S -c 64 on pool 16: default against aimd off, interleaved
#
#   bash bench/pool_outcomes.sh                     # full lengths (about 8 minutes)
#   LOW_SECS=10 SAT_SECS=5 C64_SECS=5 REPS=1 bash bench/pool_outcomes.sh   # smoke run
#
# Environment: PG_BIN, PGBOUNCER (a PgBouncer binary; SKIP_PGBOUNCER=1 to leave it out),
# PGSIDECAR_BIN (default: cargo build --release), LOW_SECS (60; the 6.67/s and -R 20 runs
# take half), SAT_SECS (20), C64_SECS (10), REPS (3), OUT (bench/results/pool_outcomes.md).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LOW_SECS=${LOW_SECS:-60}
SAT_SECS=${SAT_SECS:-20}
C64_SECS=${C64_SECS:-10}
REPS=${REPS:-3}
SKIP_PGBOUNCER=${SKIP_PGBOUNCER:-0}
OUT=${OUT:-$HERE/results/pool_outcomes.md}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

if [[ -z ${PG_BIN:-} ]]; then
    if command -v pg_config >/dev/null && [[ -x $(pg_config --bindir)/postgres ]]; then
        PG_BIN=$(pg_config --bindir)
    else
        PG_BIN=/usr/lib/postgresql/15/bin
    fi
fi
for tool in initdb pg_ctl postgres psql pgbench; do
    [[ -x $PG_BIN/$tool ]] || die "$PG_BIN/$tool not found (set PG_BIN)"
done
if [[ $SKIP_PGBOUNCER != 1 ]]; then
    PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
    [[ -x $PGBOUNCER ]] || die "pgbouncer not found: set PGBOUNCER, or SKIP_PGBOUNCER=1"
fi
if [[ -z ${PGSIDECAR_BIN:-} ]]; then
    log "building pgsidecar (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
    PGSIDECAR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgsidecar
fi

as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

WORK=$(mktemp -d /tmp/pgsidecar-outcomes.XXXXXX)
[[ $(id -u) == 0 ]] && chown postgres: "$WORK"
PIDS=()
PG_STARTED=0
cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    [[ $PG_STARTED == 1 ]] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m immediate -w stop >/dev/null 2>&1
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port)
wait_port() { # PORT
    local i
    for ((i = 0; i < 300; i++)); do
        "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "nothing answers on port $1"
}

log "PostgreSQL on port $PG_PORT"
as_pg "$PG_BIN/initdb" -D "$WORK/pgdata" -U postgres --auth=trust -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 || die "initdb failed"
cat >>"$WORK/pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 400
fsync = off
synchronous_commit = off
log_connections = on
EOF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/postgres.log" -w -t 60 start >/dev/null || die "PostgreSQL did not start"
PG_STARTED=1
wait_port "$PG_PORT"
"$PG_BIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/init.log" 2>&1 || die "pgbench -i failed"
echo 'select pg_backend_pid();' >"$WORK/pid.sql"
echo 'select pg_sleep(0.2);' >"$WORK/sleep.sql"

logins() { grep -c 'connection authorized' "$WORK/postgres.log" || true; }

# start_sidecar POOL_SIZE AIMD: sets PORT and LAST_PID (not in a subshell: PIDS must see it)
start_sidecar() {
    local port admin
    port=$(free_port)
    admin=$(free_port)
    cat >"$WORK/sidecar-$port.yaml" <<EOF
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$admin
pool_mode: transaction
upstream: {host: 127.0.0.1, port: $PG_PORT, user: postgres, tls: {sslmode: disable}}
auth: {method: trust}
pool: {size: $1, aimd: $2}
EOF
    setsid "$PGSIDECAR_BIN" --config "$WORK/sidecar-$port.yaml" >>"$WORK/sidecar-$port.log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
    wait_port "$port"
    PORT=$port
}

# start_bouncer POOL_SIZE: sets PORT and LAST_PID
start_bouncer() {
    local port
    port=$(free_port)
    printf '"postgres" ""\n' >"$WORK/userlist.txt"
    cat >"$WORK/bouncer-$port.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $1
max_client_conn = 1000
max_prepared_statements = 256
logfile = $WORK/bouncer-$port.log
pidfile = $WORK/bouncer-$port.pid
EOF
    chown postgres: "$WORK"/userlist.txt "$WORK/bouncer-$port.ini" 2>/dev/null || true
    as_pg setsid "$PGBOUNCER" "$WORK/bouncer-$port.ini" >>"$WORK/bouncer-$port.out" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $WORK/bouncer-$port.pid ]] && break
        sleep 0.1
    done
    LAST_PID=$(<"$WORK/bouncer-$port.pid")
    PIDS+=("$LAST_PID")
    wait_port "$port"
    PORT=$port
}

stop_last() {
    kill -TERM "$LAST_PID" 2>/dev/null || true
    sleep 0.2
    kill -TERM "$LAST_PID" 2>/dev/null || true
    sleep 0.3
}

pgb() { "$PG_BIN/pgbench" -n -h 127.0.0.1 -U postgres "$@" postgres; }

# p50 and p99 latency (ms, execution only: schedule lag removed) from a pgbench log.
latency() {
    cat "$@" | awk '{ lag = (NF >= 7) ? $7 : 0; print ($3 - lag) / 1000 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit } i50 = int((NR - 1) * 0.5 + 1.5); i99 = int((NR - 1) * 0.99 + 1.5); if (i99 > NR) i99 = NR; printf "%.3f %.3f\n", v[i50], v[i99] }'
}

TARGETS=(direct pgsidecar)
[[ $SKIP_PGBOUNCER != 1 ]] && TARGETS=(direct pgbouncer pgsidecar)

REPORT=$WORK/report.md
{
    echo "# Pool outcomes"
    echo
    echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgsidecar $("$PGSIDECAR_BIN" --version | awk '{print $2}')$([[ $SKIP_PGBOUNCER != 1 ]] && echo ", PgBouncer $("$PGBOUNCER" --version | awk 'NR==1 {print $2}')"), $(nproc) cores; \`bash bench/pool_outcomes.sh\` (LOW_SECS=$LOW_SECS SAT_SECS=$SAT_SECS C64_SECS=$C64_SECS REPS=$REPS)."
    echo
    echo "## Low rate (pool size 8, stock settings)"
    echo
    echo "| load | target | transactions | server logins | p50 ms | p99 ms |"
    echo "|---|---|---:|---:|---:|---:|"
} >"$REPORT"

low_rate() { # LABEL SECONDS PGBENCH-ARGS...
    local label=$1 secs=$2 t port before after n lat
    shift 2
    for t in "${TARGETS[@]}"; do
        case $t in
        direct) port=$PG_PORT ;;
        pgbouncer) start_bouncer 8 && port=$PORT ;;
        pgsidecar) start_sidecar 8 true && port=$PORT ;;
        esac
        log "$label via $t for ${secs}s"
        before=$(logins)
        rm -f "$WORK"/lat.*
        pgb -p "$port" -T "$secs" -l --log-prefix="$WORK/lat" "$@" >"$WORK/pgbench.out" 2>&1 || die "pgbench failed: $(tail -3 "$WORK/pgbench.out")"
        after=$(logins)
        n=$(cat "$WORK"/lat.* | wc -l)
        lat=$(latency "$WORK"/lat.*)
        # Direct: the logins are pgbench's own connections.
        echo "| $label | $t | $n | $((after - before)) | ${lat% *} | ${lat#* } |" >>"$REPORT"
        [[ $t != direct ]] && stop_last
    done
}

low_rate "1 tx/s, 1 client" "$LOW_SECS" -c 1 -R 1 -f "$WORK/pid.sql"
low_rate "6.67 tx/s, 1 client" "$((LOW_SECS / 2))" -c 1 -R 6.67 -f "$WORK/pid.sql"
low_rate "pgbench -S -R 20 -c 2" "$((LOW_SECS / 2))" -S -c 2 -R 20

{
    echo
    echo "Server logins are the backends PostgreSQL forked during the run (each pooler is started"
    echo "fresh and answers one psql query before it); through direct, pgbench's own connections."
    echo
    echo "## Saturation (pool size 5, 10 clients of select pg_sleep(0.2), ${SAT_SECS}s)"
    echo
    echo "| target | tps | of the physical 25 |"
    echo "|---|---:|---:|"
} >>"$REPORT"

tps_of() { awk '/^tps = / { printf "%.1f\n", $3; exit }' "$1"; }

saturation() { # LABEL START-COMMAND...
    local label=$1 port tps
    shift
    "$@"
    port=$PORT
    log "saturation via $label"
    pgb -p "$port" -c 10 -j 2 -T "$SAT_SECS" -f "$WORK/sleep.sql" >"$WORK/sat.out" 2>&1 || die "pgbench failed: $(tail -3 "$WORK/sat.out")"
    tps=$(tps_of "$WORK/sat.out")
    echo "| $label | $tps | $(awk -v t="$tps" 'BEGIN { printf "%.3f", t / 25 }') |" >>"$REPORT"
    stop_last
}
[[ $SKIP_PGBOUNCER != 1 ]] && saturation pgbouncer start_bouncer 5
saturation "pgsidecar (default)" start_sidecar 5 true
saturation "pgsidecar (aimd: false)" start_sidecar 5 false

{
    echo
    echo "## pgbench -S -c 64 on pool 16 (${C64_SECS}s x $REPS, interleaved)"
    echo
    echo "| rep | pgsidecar default tps | pgsidecar aimd: false tps | ratio |"
    echo "|---|---:|---:|---:|"
} >>"$REPORT"
start_sidecar 16 true
DEF_PORT=$PORT
DEF_PID=$LAST_PID
start_sidecar 16 false
OFF_PORT=$PORT
RATIOS=()
for ((r = 1; r <= REPS; r++)); do
    log "select c64 rep $r"
    pgb -p "$DEF_PORT" -S -M simple -c 64 -j 2 -T "$C64_SECS" >"$WORK/def.out" 2>&1 || die "pgbench failed"
    pgb -p "$OFF_PORT" -S -M simple -c 64 -j 2 -T "$C64_SECS" >"$WORK/off.out" 2>&1 || die "pgbench failed"
    d=$(tps_of "$WORK/def.out")
    o=$(tps_of "$WORK/off.out")
    ratio=$(awk -v d="$d" -v o="$o" 'BEGIN { printf "%.3f", d / o }')
    RATIOS+=("$ratio")
    echo "| $r | $d | $o | $ratio |" >>"$REPORT"
done
MEDIAN=$(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
{
    echo
    echo "Median ratio (default / aimd off): $MEDIAN"
} >>"$REPORT"
kill -TERM "$DEF_PID" 2>/dev/null || true
stop_last

mkdir -p "$(dirname "$OUT")"
cp "$REPORT" "$OUT"
cat "$REPORT"
log "report written to $OUT"
