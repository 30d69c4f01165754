#!/usr/bin/env bash
# pgbench comparison of direct PostgreSQL, PgBouncer and pgsidecar on one throwaway
# cluster. See bench/README.md for what each scenario means and how to read the report.
#
#   bash bench/run.sh                        # full run: REPS=3 x DURATION=10 s per scenario
#   DURATION=2 REPS=1 bash bench/run.sh      # smoke run
#   SCENARIOS='select-*,copy' bash bench/run.sh
#
# Environment:
#   DURATION        seconds per pgbench run (10)
#   REPS            repetitions, interleaved (3)
#   SCENARIOS       comma/space separated names or globs (all); sections: rss, copy,
#                   importer (batch-insert-c50, copy and the importer-* workloads), tls
#                   (the tls-* scenarios: pooler -> PostgreSQL over TLS)
#   SKIP_PGBOUNCER  1: direct and pgsidecar only
#   PG_BIN          PostgreSQL bin dir (pg_config --bindir, else /usr/lib/postgresql/15/bin)
#   PGBOUNCER       pgbouncer binary (from PATH, else /usr/sbin/pgbouncer); the comparison
#                   is meant against 1.25 (older ones are flagged loudly; see README)
#   PGSIDECAR_BIN   pgsidecar binary; default: cargo build --release, target/release/pgsidecar
#   SCALE           pgbench scale (10); POOL_SIZE pooler server connections (16)
#   RSS_CLIENTS     idle-client counts for the RSS section ("1000 5000")
#   COPY_ROWS       rows in the COPY file (1000000, ~106 MB)
#   COPY_SAMPLES    COPY runs (psql and psycopg) per repetition and target (3)
#   OUT             report path (bench/results/latest.md)
#   KEEP_WORK       1: keep the temporary directory (logs, raw TSVs) and print its path
#   IMPORTER_*, BYTEA_*, PIPELINE_*: importer sizes, see bench/lib/importer.sh
#   TLS_SSLMODE     sslmode of the TLS section, poolers and direct alike (require)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-}
SKIP_PGBOUNCER=${SKIP_PGBOUNCER:-0}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-16}
RSS_CLIENTS=${RSS_CLIENTS:-1000 5000}
COPY_ROWS=${COPY_ROWS:-1000000}
COPY_SAMPLES=${COPY_SAMPLES:-3}
OUT=${OUT:-$HERE/results/latest.md}
KEEP_WORK=${KEEP_WORK:-0}
PYTHON=${PYTHON:-python3}
JOBS=2

# name|pgbench arguments (@BATCH@ is the generated batch-insert script).
SCENARIO_DEFS=(
    "select-simple-c1|-S -M simple -c 1"
    "select-simple-c16|-S -M simple -c 16"
    "select-simple-c64|-S -M simple -c 64"
    "select-simple-c256|-S -M simple -c 256"
    "select-extended-c64|-S -M extended -c 64"
    "select-prepared-c64|-S -M prepared -c 64"
    "tpcb-simple-c32|-M simple -c 32"
    "select-connect-c16|-S -M simple -C -c 16"
    "batch-insert-c50|-M simple -f @BATCH@ -c 50"
)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- tools -------------------------------------------------------------------------------

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
# The headline comparison is against PgBouncer 1.25 (current as of this script): older
# ones (Debian 12 ships 1.18) lack protocol-level prepared statements in transaction mode
# (1.21) and later fixes. They still run, but the log and the report say so loudly.
# bench/README.md explains how to build 1.25.2 from source; pass it with PGBOUNCER=.
BOUNCER_MIN=1.25.0
BOUNCER_VERSION=
BOUNCER_OLD=0
if [[ $SKIP_PGBOUNCER != 1 ]]; then
    PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
    [[ -x $PGBOUNCER ]] || die "pgbouncer not found: build 1.25.2 (bench/README.md) and set PGBOUNCER=, or SKIP_PGBOUNCER=1"
    BOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR==1 {print $2}')
    [[ $BOUNCER_VERSION =~ ^[0-9]+\.[0-9]+ ]] || die "cannot read the version of $PGBOUNCER"
    if [[ $(printf '%s\n' "$BOUNCER_MIN" "$BOUNCER_VERSION" | sort -V | head -1) != "$BOUNCER_MIN" ]]; then
        BOUNCER_OLD=1
        log "WARNING: ******************************************************************"
        log "WARNING: $PGBOUNCER is PgBouncer $BOUNCER_VERSION, older than $BOUNCER_MIN."
        log "WARNING: This run does NOT compare against a current PgBouncer; the report says so."
        log "WARNING: Build 1.25.2 (see bench/README.md) and pass PGBOUNCER=/path/to/pgbouncer."
        log "WARNING: ******************************************************************"
    fi
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON)"

TARGETS=(direct pgbouncer pgsidecar)
POOLERS=(pgbouncer pgsidecar)
if [[ $SKIP_PGBOUNCER == 1 ]]; then
    TARGETS=(direct pgsidecar)
    POOLERS=(pgsidecar)
fi

# PostgreSQL and PgBouncer refuse to run as root.
as_pg() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Thousands of idle clients need file descriptors (pooler and client helper alike).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

selected() {
    [[ -z $SCENARIOS ]] && return 0
    local pat
    for pat in ${SCENARIOS//,/ }; do
        # shellcheck disable=SC2053 # glob match on purpose
        [[ $1 == $pat ]] && return 0
    done
    return 1
}

SIDECAR_GIVEN=${PGSIDECAR_BIN:+1}
if [[ -z ${PGSIDECAR_BIN:-} ]]; then
    log "building pgsidecar (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
    PGSIDECAR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgsidecar
fi
[[ -x $PGSIDECAR_BIN ]] || die "$PGSIDECAR_BIN not found"

# --- temporary directory and cleanup ------------------------------------------------------

WORK=$(mktemp -d /tmp/pgsidecar-bench.XXXXXX)
[[ $(id -u) == 0 ]] && chown postgres: "$WORK"
PG_STARTED=0
SIDECAR_PID=
BOUNCER_PID=
HOLDER_PID=
SAMPLER_PID=

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for pid in "$HOLDER_PID" "$SAMPLER_PID"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null
    done
    declare -F stop_sidecar >/dev/null && stop_sidecar
    declare -F stop_bouncer >/dev/null && stop_bouncer
    if [[ $PG_STARTED == 1 ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m immediate -w stop >/dev/null 2>&1
    fi
    wait 2>/dev/null
    if [[ $KEEP_WORK == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r PG_PORT BOUNCER_PORT SIDECAR_PORT SIDECAR_ADMIN_PORT <<<"$(free_ports 4)"

# --- helpers ------------------------------------------------------------------------------

sql() { # PORT SQL...
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -tA "$@"
}

# Set to 1 (the TLS section does) and a pooler that cannot start is logged and left down,
# so that its runs fail with a reason instead of the whole benchmark ending there.
SOFT_START=0
start_failed() {
    if [[ $SOFT_START == 1 ]]; then
        log "error: $* (its runs will fail)"
    else
        die "$*"
    fi
}

# Up to 30 s; each attempt at most 5 s (a pooler that accepts clients but cannot reach
# the server would otherwise hold the query until its own wait timeout).
wait_sql() { # PORT NAME [PID: give up as soon as it has exited]
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if [[ -n ${3:-} ]] && ! alive "$3"; then
            start_failed "$2 exited at start: $(tail -n 1 "$WORK/$2.log" 2>/dev/null | clean_reason)"
            return 0
        fi
        timeout -k 1 5 "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -tA \
            -c 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    start_failed "$2 does not answer on port $1"
}

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# utime+stime of a whole process (all threads), in clock ticks.
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $s
    echo $((${12} + ${13}))
}

proc_kib() { # PID FIELD (VmRSS, VmHWM)
    local k v _
    while read -r k v _; do
        if [[ $k == "$2:" ]]; then
            echo "$v"
            return
        fi
    done <"/proc/$1/status"
    echo 0
}

clean_reason() { tr '\t|\n' '  ;' | sed 's/;*$//' | cut -c1-200; }

port_of() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    pgbouncer) echo "$BOUNCER_PORT" ;;
    pgsidecar) echo "$SIDECAR_PORT" ;;
    esac
}

pid_of() {
    case $1 in
    direct) echo "" ;;
    pgbouncer) echo "$BOUNCER_PID" ;;
    pgsidecar) echo "$SIDECAR_PID" ;;
    esac
}

# --- PostgreSQL ---------------------------------------------------------------------------

log "PostgreSQL on port $PG_PORT ($PG_BIN)"
as_pg "$PG_BIN/initdb" -D "$WORK/pgdata" -U postgres --auth=trust -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -5 "$WORK/initdb.log")"
cat >>"$WORK/pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 400
shared_buffers = 128MB
fsync = off
synchronous_commit = off
EOF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/postgres.log" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start: $(tail -5 "$WORK/postgres.log")"
PG_STARTED=1
wait_sql "$PG_PORT" PostgreSQL

log "pgbench -i -s $SCALE"
"$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed: $(tail -5 "$WORK/pgbench-init.log")"
# Importer tables are unlogged (as bench_copy): the WAL of bulk loads would measure the
# disk, not the path through the proxy. bench_blob stores its bytea uncompressed
# (EXTERNAL: random bytes do not compress anyway).
sql "$PG_PORT" -c 'CREATE TABLE bench_batch (k bigint, v text, t timestamptz)' \
    -c 'CREATE UNLOGGED TABLE bench_copy (id int, a text, b text, c text)' \
    -c 'CREATE UNLOGGED TABLE bench_import (id bigint, name text, qty int, created timestamptz)' \
    -c 'CREATE UNLOGGED TABLE bench_blob (id int, data bytea)' \
    -c 'ALTER TABLE bench_blob ALTER data SET STORAGE EXTERNAL' -c 'VACUUM ANALYZE'

# The batch-insert script: one multi-row INSERT of 100 rows (~100 bytes each) per transaction.
BATCH_SQL=$WORK/batch.sql
{
    echo '\set k random(1, 1000000000)'
    echo 'INSERT INTO bench_batch (k, v, t) VALUES'
    for ((i = 1; i <= 100; i++)); do
        sep=,
        ((i == 100)) && sep=';'
        printf "  (:k + %d, 'row %03d abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz', now())%s\n" "$i" "$i" "$sep"
    done
} >"$BATCH_SQL"

# --- poolers ------------------------------------------------------------------------------

# SESSIONS: with the kernel's autogroup scheduling (sched_autogroup_enabled=1, the default
# on desktop and many server kernels), CPU is shared fairly between sessions first, then
# between the processes of a session. PostgreSQL's postmaster starts its own session, and
# `pgbouncer -d` or a service manager would too; a pooler left in this script's session
# would share one CPU share with pgbench, the load generator. Both poolers are therefore
# started with setsid, each in a session of its own, exactly alike. (Measured here at
# -c 16: a pooler in pgbench's session had 0.6-0.7 context switches per transaction, the
# same pooler in its own session 0.37.)

if [[ $SKIP_PGBOUNCER != 1 ]]; then
    printf '"postgres" ""\n' >"$WORK/userlist.txt"
    cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 10000
ignore_startup_parameters = extra_float_digits,options
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
; pgsidecar runs with PGSIDECAR_LOG=warn, so neither logs each connection
log_connections = 0
log_disconnections = 0
EOF
    # Protocol-level prepared statements in transaction mode arrived in 1.21.
    if [[ $(printf '%s\n' 1.21.0 "$BOUNCER_VERSION" | sort -V | head -1) == 1.21.0 ]]; then
        echo "max_prepared_statements = 256" >>"$WORK/pgbouncer.ini"
    fi
    chown postgres: "$WORK/userlist.txt" "$WORK/pgbouncer.ini" 2>/dev/null || true
fi
BOUNCER_INI=$WORK/pgbouncer.ini

start_bouncer() {
    [[ $SKIP_PGBOUNCER == 1 ]] && return 0
    rm -f "$WORK/pgbouncer.pid"
    # runuser goes through PAM, which resets the soft fd limit (to 1024 here): raise it
    # again inside, up to the hard limit, or max_client_conn cannot be reached.
    # shellcheck disable=SC2016 # expanded by the inner shell
    # setsid: each server process runs in its own session, as daemons do (see SESSIONS).
    as_pg setsid bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' pgbouncer \
        "$PGBOUNCER" "$BOUNCER_INI" >>"$WORK/pgbouncer.out" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $WORK/pgbouncer.pid ]] && break
        sleep 0.1
    done
    if [[ ! -s $WORK/pgbouncer.pid ]]; then
        start_failed "pgbouncer did not start: $(tail -n 5 "$WORK/pgbouncer.log" "$WORK/pgbouncer.out" 2>/dev/null | clean_reason)"
        return 0
    fi
    BOUNCER_PID=$(<"$WORK/pgbouncer.pid")
    wait_sql "$BOUNCER_PORT" pgbouncer "$BOUNCER_PID"
}

stop_bouncer() {
    alive "$BOUNCER_PID" || {
        BOUNCER_PID=
        return 0
    }
    kill -TERM "$BOUNCER_PID" 2>/dev/null
    local i
    for ((i = 0; i < 100; i++)); do
        alive "$BOUNCER_PID" || break
        sleep 0.05
    done
    alive "$BOUNCER_PID" && kill -KILL "$BOUNCER_PID" 2>/dev/null
    BOUNCER_PID=
    return 0
}

# Empty: pgsidecar runs from --upstream alone; else from this file (the TLS section), with
# the same flags on top.
SIDECAR_CONFIG=

start_sidecar() {
    local from=(--upstream "postgres://postgres@127.0.0.1:$PG_PORT/postgres")
    [[ -n $SIDECAR_CONFIG ]] && from=(--config "$SIDECAR_CONFIG")
    # setsid: its own session, like PostgreSQL and PgBouncer (see SESSIONS).
    # warn: no line per login/logout (logging.log_connections), as PgBouncer above.
    PGSIDECAR_LOG=warn setsid "$PGSIDECAR_BIN" "${from[@]}" \
        --listen "127.0.0.1:$SIDECAR_PORT" --admin-listen "127.0.0.1:$SIDECAR_ADMIN_PORT" \
        --pool-mode transaction --pool-size "$POOL_SIZE" >>"$WORK/pgsidecar.log" 2>&1 &
    SIDECAR_PID=$!
    wait_sql "$SIDECAR_PORT" pgsidecar "$SIDECAR_PID"
}

stop_sidecar() {
    alive "$SIDECAR_PID" || {
        SIDECAR_PID=
        return 0
    }
    # The first SIGTERM drains; a second one exits at once.
    kill -TERM "$SIDECAR_PID" 2>/dev/null
    sleep 0.1
    kill -TERM "$SIDECAR_PID" 2>/dev/null
    local i
    for ((i = 0; i < 100; i++)); do
        alive "$SIDECAR_PID" || break
        sleep 0.05
    done
    alive "$SIDECAR_PID" && kill -KILL "$SIDECAR_PID" 2>/dev/null
    wait "$SIDECAR_PID" 2>/dev/null
    SIDECAR_PID=
    return 0
}

restart() { # TARGET
    case $1 in
    pgbouncer) stop_bouncer && start_bouncer ;;
    pgsidecar) stop_sidecar && start_sidecar ;;
    esac
}

# A pooler that died during a run is restarted for the next one (the run is a failure).
# Fails if it is still not running (only possible with SOFT_START=1).
ensure_up() { # TARGET
    local pid
    pid=$(pid_of "$1")
    [[ $1 == direct ]] && return 0
    if ! alive "$pid"; then
        log "$1 is not running; restarting it"
        restart "$1"
        alive "$(pid_of "$1")" || return 1
    fi
}

start_bouncer
start_sidecar
log "pgbouncer ${BOUNCER_VERSION:-skipped} on port $BOUNCER_PORT, pgsidecar on port $SIDECAR_PORT"

# --- report metadata ----------------------------------------------------------------------

meta() { printf '%s\t%s\n' "$1" "$(printf '%s' "$2" | clean_reason)" >>"$WORK/meta.tsv"; }
printf 'key\tvalue\n' >"$WORK/meta.tsv"
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes in src/ or Cargo.*)"
fi
meta commit "$commit"
[[ -n ${SIDECAR_GIVEN:-} ]] && meta sidecar_bin "$PGSIDECAR_BIN (given in PGSIDECAR_BIN: the commit above is the checkout's, not necessarily the binary's)"
meta cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta nproc "$(nproc)"
meta kernel "$(uname -sr)"
meta loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
meta postgres "$("$PG_BIN/postgres" --version)"
meta pgbouncer "${BOUNCER_VERSION:-skipped (SKIP_PGBOUNCER=1)}"
[[ $SKIP_PGBOUNCER != 1 ]] && meta pgbouncer_bin "$PGBOUNCER"
meta pgbouncer_old "$BOUNCER_OLD"
meta pgbouncer_min "$BOUNCER_MIN"
meta rustc "$(rustc --version 2>/dev/null || echo unknown)"
meta autogroup "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a) (poolers and PostgreSQL each in their own session)"
meta settings "scale $SCALE; pool size $POOL_SIZE, transaction mode; max_connections 400, shared_buffers 128MB, fsync off, synchronous_commit off; DURATION=$DURATION REPS=$REPS"
meta duration "$DURATION"
meta reps "$REPS"

# --- pgbench scenarios --------------------------------------------------------------------

printf 'scenario\targs\trep\ttarget\tstatus\ttps\ttxns\tcpu_ticks\tclk_tck\treason\n' >"$WORK/runs.tsv"
CLK_TCK=$(getconf CLK_TCK)

# Set (the TLS section does) and direct runs of pgbench get it as PGSSLMODE.
DIRECT_SSLMODE=

# Vacuum directly (pgbench -n through a pooler cannot): what pgbench itself does first.
prepare_run() { # SCENARIO
    if [[ $1 == batch-* ]]; then
        sql "$PG_PORT" -c 'TRUNCATE bench_batch'
    else
        sql "$PG_PORT" -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' -c 'TRUNCATE pgbench_history'
    fi
}

run_pgbench() { # SCENARIO ARGS REP TARGET
    local name=$1 args=$2 rep=$3 target=$4
    local port pid logf rc=0 before=0 after ticks="" status=ok reason="" tps="" txns=""
    local envs=()
    [[ $target == direct && -n $DIRECT_SSLMODE ]] && envs=("PGSSLMODE=$DIRECT_SSLMODE")
    if ! ensure_up "$target"; then
        printf '%s\t%s\t%s\t%s\tfail\t\t\t\t%s\t%s\n' "$name" "${args//@BATCH@/batch.sql}" "$rep" "$target" \
            "$CLK_TCK" "$target is not running (it did not start; see the log)" >>"$WORK/runs.tsv"
        log "  $name rep $rep $target: FAIL $target is not running"
        return 0
    fi
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    logf=$WORK/pgbench-$name-$rep-$target.log
    prepare_run "$name"
    [[ -n $pid ]] && before=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086 # ARGS is a word list
    env "${envs[@]}" timeout -k 5 $((DURATION + 60)) "$PG_BIN/pgbench" -n -j "$JOBS" -T "$DURATION" \
        -h 127.0.0.1 -p "$port" -U postgres ${args//@BATCH@/$BATCH_SQL} postgres >"$logf" 2>&1 || rc=$?
    if [[ -n $pid ]]; then
        if alive "$pid"; then
            after=$(cpu_ticks "$pid")
            ticks=$((after - before))
        else
            status=fail
            reason="$target exited during the run"
        fi
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$logf" | head -1)
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$logf" | head -1)
    if [[ $status == ok ]] && { ((rc != 0)) || [[ -z $tps ]] || grep -q 'aborted' "$logf"; }; then
        status=fail
        reason=$(grep -m1 -iE 'error|fatal|aborted' "$logf" | sed 's/^pgbench: //')
        [[ -z $reason ]] && reason="pgbench exit status $rc"
        ((rc == 124)) && reason="timed out; $reason"
    fi
    reason=$(printf '%s' "$reason" | clean_reason)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${args//@BATCH@/batch.sql}" "$rep" "$target" "$status" \
        "$tps" "$txns" "$ticks" "$CLK_TCK" "$reason" >>"$WORK/runs.tsv"
    if [[ $status == ok ]]; then
        log "  $name rep $rep $target: $tps tps"
    else
        log "  $name rep $rep $target: FAIL $reason"
    fi
}

for ((rep = 1; rep <= REPS; rep++)); do
    for def in "${SCENARIO_DEFS[@]}"; do
        name=${def%%|*}
        args=${def#*|}
        # `importer` selects the multi-row INSERT scenario too.
        selected "$name" || { [[ $name == batch-* ]] && selected importer; } || continue
        for target in "${TARGETS[@]}"; do
            run_pgbench "$name" "$args" "$rep" "$target"
        done
    done
done

# --- RSS per idle client ------------------------------------------------------------------

printf 'clients\ttarget\tstatus\tbefore_kib\tafter_kib\treason\n' >"$WORK/rss.tsv"

measure_idle() { # N TARGET
    local n=$1 target=$2 pid before after i status=ok reason=""
    restart "$target"
    sql "$(port_of "$target")" -c 'select 1' >/dev/null
    sleep 1
    pid=$(pid_of "$target")
    before=$(proc_kib "$pid" VmRSS)
    rm -f "$WORK/idle.out" "$WORK/idle.err"
    "$PYTHON" "$HERE/idle_clients.py" --port "$(port_of "$target")" -n "$n" \
        >"$WORK/idle.out" 2>"$WORK/idle.err" &
    HOLDER_PID=$!
    for ((i = 0; i < 1200; i++)); do
        grep -qs '^ready' "$WORK/idle.out" && break
        alive "$HOLDER_PID" || break
        sleep 0.1
    done
    if grep -qs '^ready' "$WORK/idle.out"; then
        sleep 2
        after=$(proc_kib "$pid" VmRSS)
        alive "$pid" || {
            status=fail
            reason="$target exited"
        }
    else
        status=fail
        reason=$(head -c 300 "$WORK/idle.err" 2>/dev/null || true)
        [[ -z $reason ]] && reason="clients not ready in 120 s"
        after=0
    fi
    kill -TERM "$HOLDER_PID" 2>/dev/null || true
    wait "$HOLDER_PID" 2>/dev/null || true
    HOLDER_PID=
    reason=$(printf '%s' "$reason" | clean_reason)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$target" "$status" "$before" "$after" "$reason" >>"$WORK/rss.tsv"
    if [[ $status == ok ]]; then
        log "  rss $n idle clients $target: $before -> $after KiB ($(((after - before) / n)) KiB/client)"
    else
        log "  rss $n idle clients $target: FAIL $reason"
    fi
}

if selected rss; then
    for n in $RSS_CLIENTS; do
        for target in "${POOLERS[@]}"; do
            measure_idle "$n" "$target"
        done
    done
fi

# --- COPY ---------------------------------------------------------------------------------

printf 'rep\ttarget\tstatus\tseconds\tbytes\trows\trss_before_kib\trss_peak_kib\treason\n' >"$WORK/copy.tsv"

# Peak VmRSS of PID, sampled, written to FILE until killed.
sample_rss() { # PID FILE
    local peak=0 r
    while alive "$1"; do
        r=$(proc_kib "$1" VmRSS)
        if ((r > peak)); then
            peak=$r
            echo "$peak" >"$2"
        fi
        sleep 0.05
    done
}

run_copy() { # REP TARGET FILE BYTES
    local rep=$1 target=$2 file=$3 bytes=$4 port pid t0 t1 secs="" before="" peak="" hwm rows status=ok reason=""
    ensure_up "$target" || die "$target is not running"
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    sql "$PG_PORT" -c 'TRUNCATE bench_copy' -c 'CHECKPOINT'
    if [[ -n $pid ]]; then
        before=$(proc_kib "$pid" VmRSS)
        # Reset the kernel's peak-RSS mark (VmHWM) where allowed; the sampler covers the rest.
        echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
        echo "$before" >"$WORK/peak"
        sample_rss "$pid" "$WORK/peak" &
        SAMPLER_PID=$!
    fi
    t0=$(date +%s.%N)
    if sql "$port" -c "\\copy bench_copy from '$file'" >"$WORK/copy-$rep-$target.log" 2>&1; then
        t1=$(date +%s.%N)
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
        rows=$(sql "$PG_PORT" -c 'SELECT count(*) FROM bench_copy')
        if [[ $rows != "$COPY_ROWS" ]]; then
            status=fail
            reason="copied $rows rows, expected $COPY_ROWS"
        fi
    else
        status=fail
        reason=$(head -c 300 "$WORK/copy-$rep-$target.log")
    fi
    if [[ -n $pid ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
        peak=$(<"$WORK/peak")
        if alive "$pid"; then
            hwm=$(proc_kib "$pid" VmHWM)
            # VmHWM is only meaningful here if the reset worked (it is then <= lifetime peak).
            [[ -w /proc/$pid/clear_refs ]] && ((hwm > peak)) && peak=$hwm
        else
            status=fail
            reason="$target exited during the COPY"
        fi
    fi
    reason=$(printf '%s' "$reason" | clean_reason)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$target" "$status" "$secs" "$bytes" \
        "$COPY_ROWS" "$before" "$peak" "$reason" >>"$WORK/copy.tsv"
    if [[ $status == ok ]]; then
        log "  copy rep $rep $target: $secs s${peak:+, peak RSS $peak KiB (before $before)}"
    else
        log "  copy rep $rep $target: FAIL $reason"
    fi
}

if selected copy || selected importer; then
    # Fresh poolers: the RSS section leaves memory behind that would hide the COPY's own.
    for target in "${POOLERS[@]}"; do
        restart "$target"
    done
    COPY_FILE=$WORK/copy.txt
    log "generating $COPY_ROWS COPY rows"
    sql "$PG_PORT" -c "\\copy (SELECT i, md5(i::text), md5((i + 1)::text), md5((i + 2)::text) FROM generate_series(1, $COPY_ROWS) i) to '$COPY_FILE'"
    COPY_BYTES=$(stat -c %s "$COPY_FILE")
    # A COPY lasts half a second, and one run in three or so is 40 % slower for any
    # target (the machine, not the target): COPY_SAMPLES runs per repetition, interleaved,
    # all in the median.
    for ((rep = 1; rep <= REPS * COPY_SAMPLES; rep++)); do
        for target in "${TARGETS[@]}"; do
            run_copy "$rep" "$target" "$COPY_FILE" "$COPY_BYTES"
        done
    done
    rm -f "$COPY_FILE"
fi

# --- importer workloads (bench/lib/importer.sh) ---------------------------------------------

# shellcheck source=bench/lib/importer.sh
source "$HERE/lib/importer.sh"

# --- upstream TLS (bench/lib/tls.sh; last: it turns ssl on in the cluster) ----------------

# shellcheck source=bench/lib/tls.sh
source "$HERE/lib/tls.sh"

# --- report -------------------------------------------------------------------------------

mkdir -p "$(dirname "$OUT")"
"$PYTHON" "$HERE/report.py" "$WORK" >"$WORK/report.md"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
echo
log "report written to $OUT"
if [[ $BOUNCER_OLD == 1 ]]; then
    log "WARNING: PgBouncer $BOUNCER_VERSION is older than $BOUNCER_MIN: not the headline comparison (see the report)"
fi
