#!/usr/bin/env bash
# Per-transaction cost profile of PgBouncer and pgsidecar under pgbench, on one throwaway
# cluster: instructions (valgrind callgrind: deterministic, independent of machine load),
# syscalls by type (perf tracepoints, else strace) and context switches and CPU time of
# the proxy process. Fixed transaction counts (pgbench -t), never fixed durations.
#
#   bash bench/profile.sh                              # defaults (~10-15 min on 2 cores)
#   TXNS=400 NATIVE_TXNS=2000 bash bench/profile.sh    # smoke run
#   SCENARIOS='select-simple-c16' KEEP_WORK=1 bash bench/profile.sh
#
# How each number is taken, for each scenario and pooler:
#   instructions  the pooler runs under callgrind, twice: start, warm-up run (which fills
#                 the server pool), N transactions, stop; then the same with 2N. Per
#                 transaction: (I(2N) - I(N)) / N, so start-up, shut-down, warm-up and the
#                 clients' logins and logouts (same count in both) cancel out. (Two
#                 processes rather than callgrind_control -z/--dump on one: vgdb cannot
#                 reach a process of another user that sits in epoll_wait here.)
#   ctx switches  the pooler runs natively; after a warm-up run, one run of NATIVE_TXNS:
#   CPU time      voluntary + involuntary switches summed over /proc/PID/task/*/status,
#                 CPU from /proc/PID/task/*/schedstat (ns), before and after.
#   syscalls      a second run of NATIVE_TXNS on the same process, counted with perf stat
#                 on the raw_syscalls/syscalls tracepoints (no slow-down), or when perf
#                 does not work with strace -f -c (slows the pooler; counts per
#                 transaction stay meaningful, timing-dependent ones such as epoll_wait
#                 may shift). The ctx-switch/CPU run is never traced.
#   The native numbers include the NATIVE_TXNS run's client logins and logouts (c each).
#
# Environment:
#   SCENARIOS       comma/space separated names or globs (all seven below)
#   TXNS            N for the callgrind runs, total over all clients (3000); runs N and 2N
#   NATIVE_TXNS     transactions of the un-traced and the syscall run (20000)
#   WARMUP_TXNS     warm-up transactions before measuring (400)
#   POOLERS         "pgbouncer pgsidecar" (either alone works; ratios need both)
#   SYSCALL_TOOL    auto (perf if it works, else strace), perf or strace
#   SIDECAR_THREADS pgsidecar --threads (unset: its default)
#   PG_BIN          PostgreSQL bin dir (pg_config --bindir, else /usr/lib/postgresql/15/bin)
#   PGBOUNCER       pgbouncer binary (from PATH, else /usr/sbin/pgbouncer; see bench/README.md
#                   for building 1.25 from source)
#   PGSIDECAR_BIN   pgsidecar binary (default: cargo build --release, target/release)
#   SCALE           pgbench scale (10); POOL_SIZE pooler server connections (16)
#   OUT             report path (bench/results/profile.md)
#   KEEP_WORK       1: keep the temporary directory (logs, raw TSV, callgrind files) and
#                   print the callgrind file paths, for callgrind_annotate
#   INSTRUCTIONS    0: skip the callgrind runs (native figures only: a quick A/B of CPU time)
#   ANNOTATE        top-N self-cost functions per pooler and scenario appended to the
#                   report, from callgrind_annotate on the 2N process (0: none)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

SCENARIOS=${SCENARIOS:-}
TXNS=${TXNS:-3000}
NATIVE_TXNS=${NATIVE_TXNS:-20000}
WARMUP_TXNS=${WARMUP_TXNS:-400}
POOLERS=${POOLERS:-pgbouncer pgsidecar}
SYSCALL_TOOL=${SYSCALL_TOOL:-auto}
SIDECAR_THREADS=${SIDECAR_THREADS:-}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-16}
OUT=${OUT:-$HERE/results/profile.md}
KEEP_WORK=${KEEP_WORK:-0}
INSTRUCTIONS=${INSTRUCTIONS:-1}
ANNOTATE=${ANNOTATE:-0}
PYTHON=${PYTHON:-python3}
JOBS=2

# name|pgbench arguments
SCENARIO_DEFS=(
    "select-simple-c1|-S -M simple -c 1"
    "select-simple-c16|-S -M simple -c 16"
    "tpcb-simple-c32|-M simple -c 32"
    "select-simple-c64|-S -M simple -c 64"
    "select-simple-c256|-S -M simple -c 256"
    "select-extended-c64|-S -M extended -c 64"
    "select-connect-c16|-S -M simple -C -c 16"
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
for tool in valgrind callgrind_control callgrind_annotate "$PYTHON"; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

for p in $POOLERS; do
    [[ $p == pgbouncer || $p == pgsidecar ]] || die "unknown pooler in POOLERS: $p"
done
has_pooler() { [[ " $POOLERS " == *" $1 "* ]]; }

if has_pooler pgbouncer; then
    if [[ -z ${PGBOUNCER:-} ]]; then
        PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    fi
    [[ -x $PGBOUNCER ]] || die "pgbouncer not found: $PGBOUNCER (set PGBOUNCER)"
fi
if has_pooler pgsidecar; then
    if [[ -z ${PGSIDECAR_BIN:-} ]]; then
        log "building pgsidecar (cargo build --release)"
        (cd "$ROOT" && cargo build --release --quiet)
        PGSIDECAR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgsidecar
    fi
    [[ -x $PGSIDECAR_BIN ]] || die "pgsidecar not found: $PGSIDECAR_BIN (set PGSIDECAR_BIN)"
fi

# perf tracepoints count syscalls in the kernel without slowing the process; strace stops
# it at every syscall.
perf_works() {
    command -v perf >/dev/null || return 1
    local n
    n=$(perf stat -x, -e raw_syscalls:sys_enter true 2>&1 >/dev/null | awk -F, '/raw_syscalls:sys_enter/ {print $1}')
    [[ $n =~ ^[0-9]+$ ]] && ((n > 0))
}
case $SYSCALL_TOOL in
auto)
    if perf_works; then
        SYSCALL_TOOL=perf
    elif command -v strace >/dev/null; then
        SYSCALL_TOOL=strace
    else
        die "neither perf (tracepoints) nor strace works: apt-get install -y strace"
    fi
    ;;
perf) perf_works || die "perf stat -e raw_syscalls:sys_enter does not work here" ;;
strace) command -v strace >/dev/null || die "strace not found: apt-get install -y strace" ;;
*) die "SYSCALL_TOOL must be auto, perf or strace" ;;
esac

# PostgreSQL and PgBouncer refuse to run as root.
as_pg() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

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

# --- temporary directory and cleanup ------------------------------------------------------

WORK=$(mktemp -d /tmp/pgsidecar-profile.XXXXXX)
chmod 755 "$WORK"
CG=$WORK/callgrind
mkdir -p "$CG"
[[ $(id -u) == 0 ]] && chown postgres: "$WORK" "$CG"
PG_STARTED=0
BOUNCER_PID=
SIDECAR_PID=
TRACER_PID=

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $TRACER_PID ]] && kill -INT "$TRACER_PID" 2>/dev/null
    stop_pooler pgsidecar
    stop_pooler pgbouncer
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

wait_sql() { # PORT NAME PID SECONDS
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        sql "$1" -c 'select 1' >/dev/null 2>&1 && return 0
        [[ -n $3 ]] && ! kill -0 "$3" 2>/dev/null && return 1
        sleep 0.1
    done
    return 1
}

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# "voluntary involuntary cpu_ns threads", summed over the live threads of PID.
proc_sample() {
    local vol=0 invol=0 ns=0 threads=0 t k v rest
    for t in /proc/"$1"/task/*; do
        [[ -r $t/status ]] || continue
        while read -r k v; do
            case $k in
            voluntary_ctxt_switches:) vol=$((vol + v)) ;;
            nonvoluntary_ctxt_switches:) invol=$((invol + v)) ;;
            esac
        done <"$t/status" 2>/dev/null || continue
        if read -r v rest <"$t/schedstat" 2>/dev/null; then
            ns=$((ns + v))
        fi
        threads=$((threads + 1))
    done
    echo "$vol $invol $ns $threads"
}

# "minflt utime stime" of the whole process (all threads, dead ones included); times in
# clock ticks. Minor faults show an allocator that hands pages back and touches them again.
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $s
    echo "$8 ${12} ${13}"
}

record() { # SCENARIO POOLER KEY VALUE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/profile.tsv"
}

port_of() {
    case $1 in
    pgbouncer) echo "$BOUNCER_PORT" ;;
    pgsidecar) echo "$SIDECAR_PORT" ;;
    esac
}

pid_of() {
    case $1 in
    pgbouncer) echo "$BOUNCER_PID" ;;
    pgsidecar) echo "$SIDECAR_PID" ;;
    esac
}

# Per-client transaction count for about TOTAL transactions over C clients (at least 1).
per_client() { echo $((($1 + $2 - 1) / $2)); }

# pgbench ARGS against PORT, T transactions per client; output in LOG. Succeeds only if
# every transaction was processed and none failed. Extra leading words (a wrapper such
# as perf stat) come through WRAP.
WRAP=()
pgbench_t() { # PORT ARGS T LOG
    local port=$1 args=$2 t=$3 logf=$4 rc=0 done_ want failed
    # shellcheck disable=SC2086 # ARGS is a word list
    timeout -k 5 900 "${WRAP[@]}" "$PG_BIN/pgbench" -n -j "$JOBS" -t "$t" \
        -h 127.0.0.1 -p "$port" -U postgres $args postgres >"$logf" 2>&1 || rc=$?
    read -r done_ want < <(sed -n 's|^number of transactions actually processed: \([0-9]*\)/\([0-9]*\).*|\1 \2|p' "$logf" | head -1) || true
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$logf" | head -1)
    if ((rc != 0)) || [[ -z ${done_:-} || $done_ != "${want:-x}" ]] || [[ -n $failed && $failed != 0 ]] ||
        grep -qiE 'aborted|error' "$logf"; then
        log "    pgbench failed (exit $rc): $(grep -m1 -iE 'error|fatal|aborted' "$logf" || tail -1 "$logf")"
        return 1
    fi
    PGBENCH_DONE=$done_
    PGBENCH_TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$logf" | head -1)
}

prepare_run() {
    sql "$PG_PORT" -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' -c 'TRUNCATE pgbench_history'
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
wait_sql "$PG_PORT" PostgreSQL "" 30 || die "PostgreSQL does not answer on port $PG_PORT"

log "pgbench -i -s $SCALE"
"$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed: $(tail -5 "$WORK/pgbench-init.log")"
sql "$PG_PORT" -c 'VACUUM ANALYZE'

# --- poolers ------------------------------------------------------------------------------

# Both poolers run in a session of their own (setsid), as daemons do: with autogroup
# scheduling a pooler left in pgbench's session would share its CPU share (see run.sh).

BOUNCER_VERSION=
if has_pooler pgbouncer; then
    BOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR==1 {print $2}')
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
log_connections = 0
log_disconnections = 0
EOF
    if [[ $(printf '%s\n' 1.21.0 "$BOUNCER_VERSION" | sort -V | head -1) == 1.21.0 ]]; then
        echo "max_prepared_statements = 256" >>"$WORK/pgbouncer.ini"
    fi
    chown postgres: "$WORK/userlist.txt" "$WORK/pgbouncer.ini" 2>/dev/null || true
fi

SIDECAR_ARGS=(--upstream "postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    --listen "127.0.0.1:$SIDECAR_PORT" --admin-listen "127.0.0.1:$SIDECAR_ADMIN_PORT"
    --pool-mode transaction --pool-size "$POOL_SIZE")
[[ -n $SIDECAR_THREADS ]] && SIDECAR_ARGS+=(--threads "$SIDECAR_THREADS")

# start_pooler POOLER [CALLGRIND_OUT]: with CALLGRIND_OUT, under callgrind.
start_pooler() {
    local pooler=$1 cgout=${2:-} vg=() wait_s=30
    if [[ -n $cgout ]]; then
        vg=(valgrind --tool=callgrind --callgrind-out-file="$cgout" --trace-children=no --vgdb=no)
        wait_s=120
    fi
    case $pooler in
    pgbouncer)
        rm -f "$WORK/pgbouncer.pid"
        # runuser resets the soft fd limit through PAM: raise it again inside.
        # shellcheck disable=SC2016 # expanded by the inner shell
        as_pg setsid bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' pgbouncer \
            "${vg[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini" >>"$WORK/pgbouncer.out" 2>&1 &
        local i
        for ((i = 0; i < wait_s * 10; i++)); do
            [[ -s $WORK/pgbouncer.pid ]] && break
            sleep 0.1
        done
        [[ -s $WORK/pgbouncer.pid ]] ||
            die "pgbouncer did not start: $(tail -5 "$WORK/pgbouncer.log" "$WORK/pgbouncer.out" 2>/dev/null)"
        BOUNCER_PID=$(<"$WORK/pgbouncer.pid")
        ;;
    pgsidecar)
        # warn: no line per login/logout, as PgBouncer above.
        PGSIDECAR_LOG=warn setsid "${vg[@]}" "$PGSIDECAR_BIN" "${SIDECAR_ARGS[@]}" >>"$WORK/pgsidecar.log" 2>&1 &
        SIDECAR_PID=$!
        ;;
    esac
    wait_sql "$(port_of "$pooler")" "$pooler" "$(pid_of "$pooler")" "$wait_s" ||
        die "$pooler does not answer on port $(port_of "$pooler"): $(tail -3 "$WORK/$pooler".{log,out} 2>/dev/null)"
}

# Stop and wait for the exit (under valgrind: until callgrind has written its file).
stop_pooler() {
    local pooler=$1 pid i
    pid=$(pid_of "$pooler")
    if alive "$pid"; then
        case $pooler in
        pgbouncer) kill -INT "$pid" 2>/dev/null ;;
        pgsidecar)
            # The first SIGTERM drains; a second one exits at once.
            kill -TERM "$pid" 2>/dev/null
            sleep 0.2
            kill -TERM "$pid" 2>/dev/null
            ;;
        esac
        for ((i = 0; i < 600; i++)); do
            alive "$pid" || break
            sleep 0.05
        done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    fi
    case $pooler in
    pgbouncer) BOUNCER_PID= ;;
    pgsidecar) SIDECAR_PID= ;;
    esac
    return 0
}

# Total instructions (Ir) of a callgrind dump.
cg_total() {
    local v
    v=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$1" | head -1)
    [[ -z $v ]] && v=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$1" | head -1)
    echo "${v:-}"
}

# --- measurements -------------------------------------------------------------------------

# One pooler process under callgrind: warm-up, then T transactions per client, stop; the
# instruction total of the whole process life goes to IR_TOTAL, the count to IR_TXNS.
callgrind_run() { # SCENARIO ARGS POOLER CLIENTS T OUTFILE TAG
    local name=$1 args=$2 pooler=$3 c=$4 t=$5 cgout=$6 tag=$7 port ok=1
    port=$(port_of "$pooler")
    IR_TOTAL=
    IR_TXNS=
    start_pooler "$pooler" "$cgout"
    prepare_run
    pgbench_t "$port" "$args" "$(per_client "$WARMUP_TXNS" "$c")" "$WORK/pgbench-$name-$pooler-vg$tag-warmup.log" &&
        pgbench_t "$port" "$args" "$t" "$WORK/pgbench-$name-$pooler-vg$tag.log" || ok=0
    IR_TXNS=${PGBENCH_DONE:-}
    # Stopping waits for the exit: callgrind writes the file then.
    stop_pooler "$pooler"
    ((ok)) || return 1
    IR_TOTAL=$(cg_total "$cgout")
    [[ -n $IR_TOTAL ]] || {
        log "    no callgrind total in $cgout"
        return 1
    }
}

measure_instructions() { # SCENARIO ARGS POOLER CLIENTS
    local name=$1 args=$2 pooler=$3 c=$4 t ir1 ir2 n1 n2
    t=$(per_client "$TXNS" "$c")
    log "  $pooler under callgrind: two processes, warm-up + ${t}x$c and warm-up + $((2 * t))x$c transactions"
    callgrind_run "$name" "$args" "$pooler" "$c" "$t" "$CG/$name.$pooler.N.out" N || return 0
    ir1=$IR_TOTAL n1=$IR_TXNS
    callgrind_run "$name" "$args" "$pooler" "$c" $((2 * t)) "$CG/$name.$pooler.2N.out" 2N || return 0
    ir2=$IR_TOTAL n2=$IR_TXNS
    record "$name" "$pooler" ir1 "$ir1"
    record "$name" "$pooler" ir2 "$ir2"
    record "$name" "$pooler" n1 "$n1"
    record "$name" "$pooler" n2 "$n2"
    record "$name" "$pooler" cgfile "$CG/$name.$pooler.2N.out"
    log "    $(((ir2 - ir1) / (n2 - n1))) instructions/txn (totals $ir1, $ir2)"
}

# Syscall counts of PID during a pgbench run, as "name count" lines ("total" included)
# in COUNTS.
syscall_run() { # PID PORT ARGS T LOG RAW COUNTS
    local pid=$1 port=$2 args=$3 t=$4 logf=$5 raw=$6 counts=$7 rc=0
    case $SYSCALL_TOOL in
    perf)
        # perf stat -p PID WORKLOAD counts PID's threads while the workload (pgbench) runs.
        WRAP=(perf stat -x ',' -o "$raw" -e raw_syscalls:sys_enter -e 'syscalls:sys_enter_*' -p "$pid" --)
        pgbench_t "$port" "$args" "$t" "$logf" || rc=1
        WRAP=()
        ((rc == 0)) || return 1
        awk -F, '$1 ~ /^[0-9]+$/ && $3 == "raw_syscalls:sys_enter" {print "total", $1}
                 $1 ~ /^[0-9]+$/ && $1 > 0 && $3 ~ /^syscalls:sys_enter_/ {sub(/^syscalls:sys_enter_/, "", $3); print $3, $1}' "$raw" >"$counts"
        ;;
    strace)
        strace -f -c -o "$raw" -p "$pid" 2>"$raw.err" &
        TRACER_PID=$!
        sleep 1
        pgbench_t "$port" "$args" "$t" "$logf" || rc=1
        kill -INT "$TRACER_PID" 2>/dev/null
        wait "$TRACER_PID" 2>/dev/null || true
        TRACER_PID=
        ((rc == 0)) || return 1
        # % time  seconds  usecs/call  calls  [errors]  syscall; then "total".
        awk '$1 ~ /^[0-9.]+$/ && NF >= 5 {print $NF, $4}' "$raw" >"$counts"
        ;;
    esac
}

measure_native() { # SCENARIO ARGS POOLER CLIENTS
    local name=$1 args=$2 pooler=$3 c=$4 pid t port b a t0 t1 counts k v
    t=$(per_client "$NATIVE_TXNS" "$c")
    port=$(port_of "$pooler")
    log "  $pooler native: warm-up, ${t}x$c un-traced, ${t}x$c under $SYSCALL_TOOL"
    start_pooler "$pooler"
    pid=$(pid_of "$pooler")
    prepare_run
    if ! pgbench_t "$port" "$args" "$(per_client "$WARMUP_TXNS" "$c")" "$WORK/pgbench-$name-$pooler-warmup.log"; then
        stop_pooler "$pooler"
        return 0
    fi
    prepare_run
    read -r -a b <<<"$(proc_sample "$pid")"
    read -r -a t0 <<<"$(cpu_ticks "$pid")"
    if pgbench_t "$port" "$args" "$t" "$WORK/pgbench-$name-$pooler-native.log"; then
        read -r -a a <<<"$(proc_sample "$pid")"
        read -r -a t1 <<<"$(cpu_ticks "$pid")"
        record "$name" "$pooler" ctx_txns "$PGBENCH_DONE"
        record "$name" "$pooler" ctx_vol $((a[0] - b[0]))
        record "$name" "$pooler" ctx_invol $((a[1] - b[1]))
        record "$name" "$pooler" cpu_ns $((a[2] - b[2]))
        record "$name" "$pooler" minflt $((t1[0] - t0[0]))
        record "$name" "$pooler" utime_ticks $((t1[1] - t0[1]))
        record "$name" "$pooler" stime_ticks $((t1[2] - t0[2]))
        record "$name" "$pooler" threads "${b[3]}/${a[3]}"
        record "$name" "$pooler" tps "$PGBENCH_TPS"
        log "    $PGBENCH_TPS tps; ctx switches vol $((a[0] - b[0])) invol $((a[1] - b[1])); cpu $(((a[2] - b[2]) / PGBENCH_DONE)) ns/txn; threads ${a[3]}"
    fi
    prepare_run
    counts=$WORK/syscalls-$name-$pooler.txt
    if syscall_run "$pid" "$port" "$args" "$t" "$WORK/pgbench-$name-$pooler-syscalls.log" \
        "$WORK/syscalls-$name-$pooler.raw" "$counts"; then
        record "$name" "$pooler" sys_txns "$PGBENCH_DONE"
        while read -r k v; do
            [[ -n $k ]] && record "$name" "$pooler" "sys:$k" "$v"
        done <"$counts"
        log "    syscalls: $(awk '$1 == "total" {print $2}' "$counts") in $PGBENCH_DONE txns"
    fi
    stop_pooler "$pooler"
}

# --- report metadata ----------------------------------------------------------------------

meta() { printf '%s\t%s\n' "$1" "$(printf '%s' "$2" | tr '\t\n' '  ')" >>"$WORK/meta.tsv"; }
printf 'key\tvalue\n' >"$WORK/meta.tsv"
printf 'scenario\tpooler\tkey\tvalue\n' >"$WORK/profile.tsv"
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
meta commit "$commit"
if has_pooler pgsidecar; then
    meta pgsidecar "$PGSIDECAR_BIN ($("$PGSIDECAR_BIN" --version 2>/dev/null | head -1)), threads: ${SIDECAR_THREADS:-default}"
fi
has_pooler pgbouncer && meta pgbouncer "$PGBOUNCER ($BOUNCER_VERSION)"
meta postgres "$("$PG_BIN/postgres" --version)"
meta cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta nproc "$(nproc)"
meta kernel "$(uname -sr)"
meta "loadavg (start)" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta valgrind "$(valgrind --version)"
case $SYSCALL_TOOL in
perf) meta syscalls "perf $(perf --version | awk '{print $3}'): stat on raw_syscalls:sys_enter and syscalls:sys_enter_* (no slow-down)" ;;
strace) meta syscalls "$(strace -V | head -1): strace -f -c, attached to the running pooler (slows it; counts of timing-dependent calls such as epoll_wait may shift)" ;;
esac
meta settings "scale $SCALE; pool size $POOL_SIZE, transaction mode; pgbench -j $JOBS; callgrind N=TXNS=$TXNS (runs N, 2N); NATIVE_TXNS=$NATIVE_TXNS; WARMUP_TXNS=$WARMUP_TXNS"
printf 'scenario\targs\n' >"$WORK/scenarios.tsv"

# --- scenarios ----------------------------------------------------------------------------

for def in "${SCENARIO_DEFS[@]}"; do
    name=${def%%|*}
    args=${def#*|}
    selected "$name" || continue
    printf '%s\t%s\n' "$name" "$args" >>"$WORK/scenarios.tsv"
    clients=$(sed -n 's/.*-c \([0-9]*\).*/\1/p' <<<"$args")
    log "$name: pgbench $args"
    if [[ $INSTRUCTIONS == 1 ]]; then
        for pooler in $POOLERS; do
            measure_instructions "$name" "$args" "$pooler" "$clients"
        done
    fi
    for pooler in $POOLERS; do
        measure_native "$name" "$args" "$pooler" "$clients"
    done
done

[[ $INSTRUCTIONS == 1 ]] || meta instructions "not measured (INSTRUCTIONS=0)"
meta "loadavg (end)" "$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report -------------------------------------------------------------------------------

mkdir -p "$(dirname "$OUT")"
"$PYTHON" "$HERE/profile_report.py" "$WORK" "$ANNOTATE" >"$WORK/report.md"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
echo
log "report written to $OUT"
if [[ $KEEP_WORK == 1 ]]; then
    log "callgrind files, N and 2N processes (e.g. callgrind_annotate --inclusive=no FILE; per-txn diff: ANNOTATE=25):"
    awk -F'\t' '$3 == "cgfile" {n = $4; sub(/\.2N\.out$/, ".N.out", n); print $1 " " $2 ": " n " " $4}' "$WORK/profile.tsv" | while read -r line; do
        log "  $line"
    done
fi
