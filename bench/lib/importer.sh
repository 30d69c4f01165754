# shellcheck shell=bash
# Sourced by bench/run.sh: the importer workloads (bench/importer.py) through psycopg 3
# and asyncpg, against every target, interleaved, REPS times. Uses run.sh's helpers and
# globals (WORK, ROOT, HERE, PG_PORT, TARGETS, REPS, CLK_TCK, sql, log, ensure_up,
# port_of, pid_of, alive, cpu_ticks, clean_reason). Writes $WORK/importer.tsv.
#
# Sizes (full size: each run a few seconds on a 2-core machine):
#   IMPORTER_ROWS        rows per executemany transaction (20000); IMPORTER_TXNS
#                        transactions per run (10)
#   IMPORTER_COPY_ROWS   rows of the psycopg cursor.copy() variant (COPY_ROWS)
#   BYTEA_MB             bytea size in MB (20); BYTEA_REPEAT round trips per run (10)
#   PIPELINE_STATEMENTS  statements per pipeline (1000); PIPELINE_REPEAT pipelines (200)
#   IMPORTER_PYTHON      a Python with psycopg 3 and asyncpg; default: the test venv
#                        (tests/setup-env.sh ensure_venv, target/test-venv), created on
#                        first use from tests/drivers/requirements.txt
#   IMPORTER_TIMEOUT     seconds before one run counts as failed (300)

IMPORTER_ROWS=${IMPORTER_ROWS:-20000}
IMPORTER_TXNS=${IMPORTER_TXNS:-10}
IMPORTER_COPY_ROWS=${IMPORTER_COPY_ROWS:-$COPY_ROWS}
BYTEA_MB=${BYTEA_MB:-20}
BYTEA_REPEAT=${BYTEA_REPEAT:-10}
PIPELINE_STATEMENTS=${PIPELINE_STATEMENTS:-1000}
PIPELINE_REPEAT=${PIPELINE_REPEAT:-200}
IMPORTER_TIMEOUT=${IMPORTER_TIMEOUT:-300}

# name|bench/importer.py arguments
IMPORTER_DEFS=(
    "importer-psycopg-executemany|--workload psycopg-executemany --rows $IMPORTER_ROWS --repeat $IMPORTER_TXNS"
    "importer-asyncpg-executemany|--workload asyncpg-executemany --rows $IMPORTER_ROWS --repeat $IMPORTER_TXNS"
    "importer-asyncpg-executemany-nocache|--workload asyncpg-executemany-nocache --rows $IMPORTER_ROWS --repeat $IMPORTER_TXNS"
    "importer-psycopg-copy|--workload psycopg-copy --rows $IMPORTER_COPY_ROWS"
    "importer-bytea|--workload bytea --mb $BYTEA_MB --repeat $BYTEA_REPEAT"
    "importer-psycopg-pipeline|--workload psycopg-pipeline --statements $PIPELINE_STATEMENTS --repeat $PIPELINE_REPEAT"
)

printf 'workload\targs\trep\ttarget\tstatus\tseconds\tunits\tunit\tbytes\tstatements\tbest\tcpu_ticks\tclk_tck\treason\n' \
    >"$WORK/importer.tsv"

# Set by importer_python: the interpreter, or empty with IMPORTER_PY_ERROR saying why.
IMPORTER_PY=
IMPORTER_PY_ERROR=

importer_python() {
    if [[ -n ${IMPORTER_PYTHON:-} ]]; then
        IMPORTER_PY=$IMPORTER_PYTHON
    else
        local venv
        # A subshell: setup-env.sh defines helpers run.sh does not need.
        # shellcheck disable=SC1091 # sourced at run time
        if venv=$(
            source "$ROOT/tests/setup-env.sh" &&
                ensure_venv "$TEST_VENV" "$ROOT/tests/drivers/requirements.txt" >&2 &&
                echo "$TEST_VENV"
        ) 2>"$WORK/venv.log"; then
            IMPORTER_PY=$venv/bin/python
        else
            IMPORTER_PY_ERROR="cannot set up the Python venv: $(tail -2 "$WORK/venv.log" | clean_reason)"
            return 1
        fi
    fi
    if ! "$IMPORTER_PY" -c 'import psycopg, asyncpg' 2>"$WORK/venv.log"; then
        IMPORTER_PY_ERROR="$IMPORTER_PY lacks psycopg or asyncpg: $(tail -1 "$WORK/venv.log" | clean_reason)"
        IMPORTER_PY=
        return 1
    fi
    meta importer_drivers "$("$IMPORTER_PY" -c 'import sys, psycopg, asyncpg; print("Python %d.%d.%d" % sys.version_info[:3], "psycopg", psycopg.__version__, "(libpq %s, %s)" % (psycopg.pq.version(), psycopg.pq.__impl__), "asyncpg", asyncpg.__version__)')"
}

run_importer() { # NAME ARGS REP TARGET
    local name=$1 wl_args=$2 rep=$3 target=$4
    local port pid out err rc=0 before=0 ticks="" status=ok reason="" line kv have
    local -A res=()
    port=$(port_of "$target")
    out=$WORK/$name-$rep-$target.out
    err=$WORK/$name-$rep-$target.err
    if [[ -z $IMPORTER_PY ]]; then
        status=fail
        reason=$IMPORTER_PY_ERROR
    elif ! ensure_up "$target"; then
        status=fail
        reason="$target is not running (it did not start; see the log)"
    else
        pid=$(pid_of "$target")
        sql "$PG_PORT" -c 'TRUNCATE bench_import, bench_blob, bench_copy' -c 'CHECKPOINT'
        [[ -n $pid ]] && before=$(cpu_ticks "$pid")
        # shellcheck disable=SC2086 # ARGS is a word list
        timeout -k 5 "$IMPORTER_TIMEOUT" "$IMPORTER_PY" "$HERE/importer.py" --port "$port" $wl_args \
            >"$out" 2>"$err" || rc=$?
        if [[ -n $pid ]]; then
            if alive "$pid"; then
                ticks=$(($(cpu_ticks "$pid") - before))
            else
                status=fail
                reason="$target exited during the run"
            fi
        fi
        line=$(grep -m1 '^RESULT ' "$out" || true)
        for kv in $line; do
            [[ $kv == *=* ]] && res[${kv%%=*}]=${kv#*=}
        done
        if [[ $status == ok ]] && { ((rc != 0)) || [[ -z ${res[seconds]:-} ]]; }; then
            status=fail
            reason=$(grep -v '^\s*$' "$err" | tail -1)
            [[ -z $reason ]] && reason="importer.py exit status $rc"
            ((rc == 124)) && reason="timed out after $IMPORTER_TIMEOUT s; $reason"
        fi
        # What the workload says it wrote must be in the table, seen directly.
        if [[ $status == ok && -n ${res[table]:-} ]]; then
            have=$(sql "$PG_PORT" -c "SELECT count(*) FROM ${res[table]}")
            if [[ $have != "${res[rows]:-}" ]]; then
                status=fail
                reason="${res[table]} has $have rows directly, expected ${res[rows]:-?}"
            fi
        fi
    fi
    reason=$(printf '%s' "$reason" | clean_reason)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wl_args" "$rep" "$target" "$status" \
        "${res[seconds]:-}" "${res[units]:-}" "${res[unit]:-}" "${res[bytes]:-}" "${res[statements]:-}" \
        "${res[best]:-}" "$ticks" "$CLK_TCK" "$reason" >>"$WORK/importer.tsv"
    if [[ $status == ok ]]; then
        log "  $name rep $rep $target: ${res[units]} ${res[unit]} in ${res[seconds]} s"
    else
        log "  $name rep $rep $target: FAIL $reason"
    fi
}

importer_selected=()
for def in "${IMPORTER_DEFS[@]}"; do
    if selected "${def%%|*}" || selected importer; then
        importer_selected+=("$def")
    fi
done
if ((${#importer_selected[@]})); then
    log "importer workloads (Python venv)"
    importer_python || log "  $IMPORTER_PY_ERROR (every importer run will count as failed)"
    meta importer_sizes "executemany $IMPORTER_TXNS transactions x $IMPORTER_ROWS rows; psycopg copy $IMPORTER_COPY_ROWS rows; bytea $BYTEA_MB MB x $BYTEA_REPEAT; pipeline $PIPELINE_STATEMENTS statements x $PIPELINE_REPEAT"
    for ((rep = 1; rep <= REPS; rep++)); do
        for def in "${importer_selected[@]}"; do
            # The COPY is as short as psql's, and as noisy: COPY_SAMPLES runs (run.sh).
            samples=1
            [[ ${def%%|*} == importer-psycopg-copy ]] && samples=$COPY_SAMPLES
            for ((sample = 1; sample <= samples; sample++)); do
                for target in "${TARGETS[@]}"; do
                    run_importer "${def%%|*}" "${def#*|}" "$(((rep - 1) * samples + sample))" "$target"
                done
            done
        done
    done
fi
