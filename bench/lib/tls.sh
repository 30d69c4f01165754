# shellcheck shell=bash
# Sourced by bench/run.sh, last: pgbench scenarios with the pooler -> PostgreSQL leg over
# TLS (clients still talk plaintext to the pooler; direct runs use PGSSLMODE=require for
# reference). Turns ssl on in the throwaway cluster (self-signed certificate, reload), then
# restarts both poolers on their usual ports with TLS to the server: PgBouncer with
# server_tls_sslmode, pgsidecar from a YAML file with upstream.tls.sslmode. After each
# pooler run, pg_stat_ssl is read directly to record that its server connections really
# are TLS. Uses run.sh's helpers and globals. Writes runs.tsv rows named tls-* and
# $WORK/tls.tsv (scenario, rep, target, tls, plain, detail).

TLS_SSLMODE=${TLS_SSLMODE:-require}
TLS_BASE=(select-simple-c16 select-simple-c64 select-extended-c64 tpcb-simple-c32 select-connect-c16)

printf 'scenario\trep\ttarget\ttls\tplain\tdetail\n' >"$WORK/tls.tsv"

tls_defs=()
for base in "${TLS_BASE[@]}"; do
    if selected "tls-$base" || selected tls; then
        for def in "${SCENARIO_DEFS[@]}"; do
            [[ ${def%%|*} == "$base" ]] && tls_defs+=("tls-$def")
        done
    fi
done

# The server connections of TARGET's process, as "tls|plain|detail": its sockets to
# PostgreSQL (ss) matched by client port in pg_stat_activity, TLS or not per pg_stat_ssl.
# Without ss: every client backend but our own query, marked unattributed.
tls_census() { # TARGET
    local pid ports filter note=""
    pid=$(pid_of "$1")
    if command -v ss >/dev/null; then
        ports=$(ss -Htnp state established "( dport = :$PG_PORT )" 2>/dev/null |
            awk -v p="pid=$pid," 'index($0, p) {n = split($3, a, ":"); print a[n]}' | paste -sd, -)
        filter="AND a.client_port IN (${ports:-0})"
    else
        filter="AND a.pid <> pg_backend_pid()"
        note="; unattributed (no ss): all client backends"
    fi
    PGSSLMODE=disable sql "$PG_PORT" -F '|' -c "
        SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl),
               coalesce(string_agg(DISTINCT s.version || ' ' || s.cipher, ', '), '') || '$note'
        FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
        WHERE a.backend_type = 'client backend' AND a.client_addr = '127.0.0.1' $filter"
}

# Turns ssl on; prints why not on failure.
tls_enable_server() {
    local i
    command -v openssl >/dev/null || {
        echo "openssl not found (apt-get install -y openssl)"
        return 1
    }
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=127.0.0.1" \
        -keyout "$WORK/server.key" -out "$WORK/server.crt" >"$WORK/openssl.log" 2>&1 || {
        tail -n 2 "$WORK/openssl.log"
        return 1
    }
    chmod 0600 "$WORK/server.key" "$WORK/server.crt"
    [[ $(id -u) == 0 ]] && chown postgres: "$WORK/server.key" "$WORK/server.crt"
    cat >>"$WORK/pgdata/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = '$WORK/server.crt'
ssl_key_file = '$WORK/server.key'
CONF
    sql "$PG_PORT" -c 'SELECT pg_reload_conf()' >/dev/null || return 1
    for ((i = 0; i < 50; i++)); do
        if [[ $(PGSSLMODE=require sql "$PG_PORT" -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>/dev/null) == t ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "PostgreSQL does not accept TLS after reload: $(grep -iE 'ssl|certificate|key' "$WORK/postgres.log" | tail -n 2)"
    return 1
}

if ((${#tls_defs[@]})); then
    log "upstream TLS: ssl on in PostgreSQL, poolers restarted with sslmode=$TLS_SSLMODE to the server"
    tls_error=
    tls_error=$(tls_enable_server) || tls_error="TLS set-up failed: ${tls_error:-unknown}"
    meta tls_server "$(PGSSLMODE=disable sql "$PG_PORT" -c 'SHOW ssl') (self-signed RSA 2048 certificate, CN=127.0.0.1)"

    stop_bouncer
    stop_sidecar
    if [[ $SKIP_PGBOUNCER != 1 ]]; then
        BOUNCER_INI=$WORK/pgbouncer-tls.ini
        {
            cat "$WORK/pgbouncer.ini"
            echo "; upstream TLS (bench/lib/tls.sh)"
            echo "server_tls_sslmode = $TLS_SSLMODE"
        } >"$BOUNCER_INI"
        chown postgres: "$BOUNCER_INI" 2>/dev/null || true
    fi
    # Everything but TLS as --upstream gives (trust, each client logs in as itself); the
    # listen addresses, pool mode and size come from the same flags as before.
    SIDECAR_CONFIG=$WORK/pgsidecar-tls.yaml
    cat >"$SIDECAR_CONFIG" <<YAML
upstream:
  host: 127.0.0.1
  port: $PG_PORT
  tls:
    sslmode: $TLS_SSLMODE
auth:
  method: trust
logging:
  level: warn
YAML
    if ! "$PGSIDECAR_BIN" --config "$SIDECAR_CONFIG" check >"$WORK/pgsidecar-check.log" 2>&1; then
        log "  pgsidecar check: $(clean_reason <"$WORK/pgsidecar-check.log")"
    fi
    meta tls_settings "server ssl=on; PgBouncer server_tls_sslmode = $TLS_SSLMODE; pgsidecar upstream.tls.sslmode: $TLS_SSLMODE; direct PGSSLMODE=$TLS_SSLMODE; clients to the poolers in plaintext"

    # shellcheck disable=SC2034 # read by start_failed in run.sh
    SOFT_START=1
    start_bouncer
    start_sidecar
    DIRECT_SSLMODE=$TLS_SSLMODE
    for ((rep = 1; rep <= REPS; rep++)); do
        for def in "${tls_defs[@]}"; do
            name=${def%%|*}
            for target in "${TARGETS[@]}"; do
                if [[ -n $tls_error ]]; then
                    printf '%s\t%s\t%s\t%s\tfail\t\t\t\t%s\t%s\n' "$name" "${def#*|}" "$rep" "$target" \
                        "$CLK_TCK" "$(printf '%s' "$tls_error" | clean_reason)" >>"$WORK/runs.tsv"
                    log "  $name rep $rep $target: FAIL $tls_error"
                    continue
                fi
                run_pgbench "$name" "${def#*|}" "$rep" "$target"
                if [[ $target != direct ]]; then
                    census=$(tls_census "$target" || echo '||census query failed')
                    IFS='|' read -r n_tls n_plain detail <<<"$census"
                    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rep" "$target" "$n_tls" "$n_plain" "$detail" >>"$WORK/tls.tsv"
                    log "  $name rep $rep $target: server connections $n_tls TLS, $n_plain plaintext ($detail)"
                    if [[ $n_plain != 0 || $n_tls == 0 ]]; then
                        log "  WARNING: $target's server connections are not all TLS"
                    fi
                fi
            done
        done
    done
    # shellcheck disable=SC2034 # read by run_pgbench in run.sh
    DIRECT_SSLMODE=
fi
