#!/usr/bin/env bash
# Validates the deployment artifacts: deploy/, Dockerfile, .dockerignore, proxy.yaml.
#
#   cargo build --release && tests/deploy/validate.sh
#
# Static checks: yamllint; kustomize build + kubernetes-validate (bundled schemas, no
# network) of both Kubernetes variants; policy checks on the rendered manifests
# (probes, shutdown budget, secrets, resources, PodMonitor, `pgsidecar check` of the
# ConfigMap); promtool check rules/config and unit tests of the alerts; the Grafana
# dashboard's structure; the compose file against the compose spec; hadolint and a
# project checklist for the Dockerfile.
# Live checks: a throwaway PostgreSQL 15 with the compose init SQL, the release binary
# in front of it, the example importer (COPY + executemany upserts) and pgbench through
# it; then `promtool check metrics` on a scrape, every pgsidecar_* name used by the
# dashboard and the alerts must exist in that scrape, every dashboard query must return
# series on a real Prometheus scraping the proxy, every alert rule must evaluate
# healthily, and the drain contract the manifests rely on (SIGTERM, /quitquitquit).
#
# Environment:
#   PGSIDECAR_BIN          binary to run (default target/release/pgsidecar)
#   PGSIDECAR_DEPLOY_VENV  Python venv for the tools (default target/deploy-venv; made by
#                          tests/setup-env.sh, as tests/run-all.sh does)
#   PG_BIN                 PostgreSQL server binaries (default /usr/lib/postgresql/15/bin)
#   KEEP_WORK=1            keep the temporary directory (logs, scrapes, rendered YAML)
# Needs: python3 (venv, pip reaching PyPI), kubectl for `kubectl kustomize` (without it
# a small renderer of the kustomize features deploy/kubernetes uses stands in), curl,
# PostgreSQL 15 server + psql + pgbench, promtool and prometheus (Debian package
# `prometheus`) and docker-compose (Debian package; only to parse the compose file);
# Debian packages are installed with apt-get (--no-install-recommends, as root or through
# sudo) when missing.
# Prints PASS/FAIL/SKIP per check and ends with `deploy: N passed, N failed, N skipped`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PGSIDECAR_BIN="${PGSIDECAR_BIN:-target/release/pgsidecar}"
[[ "$PGSIDECAR_BIN" = /* ]] || PGSIDECAR_BIN="$ROOT/$PGSIDECAR_BIN"
# as_root, apt_install, ensure_venv, DEPLOY_VENV.
# shellcheck source=SCRIPTDIR/../setup-env.sh
. "$ROOT/tests/setup-env.sh"
VENV="$DEPLOY_VENV"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PY="$VENV/bin/python"
CHECK="$PY $ROOT/tests/deploy/check_deploy.py"
# Kubernetes versions whose bundled schemas the manifests are validated against:
# native sidecars need 1.29+ (on by default from 1.29); the legacy variant targets
# older clusters, down to the oldest schema kubernetes-validate ships.
K8S_NATIVE_VERSIONS=(1.29.0 1.33.0)
K8S_LEGACY_VERSIONS=(1.25.0 1.33.0)

WORK="$(mktemp -d /tmp/pgsidecar-deploy.XXXXXX)"
chmod 755 "$WORK"
TOKEN="validate-$$-$RANDOM"

passed=0
failed=0
skipped=0
n=0

cleanup() {
    local f pid
    for f in "$WORK"/*.pid; do
        [[ -e "$f" ]] || continue
        pid="$(cat "$f")"
        kill "$pid" 2>/dev/null || true
    done
    if [[ -f "$WORK/pg/data/postmaster.pid" ]]; then
        pg_as "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [[ "${KEEP_WORK:-0}" = 1 ]]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# check NAME COMMAND...: runs COMMAND in a subshell with errexit (so any failing step
# fails the check), logs its output, prints PASS/FAIL (or SKIP for exit code 77).
check() {
    local name="$1"
    shift
    n=$((n + 1))
    local log="$WORK/check-$n.log" rc=0
    (set -euo pipefail; "$@") >"$log" 2>&1 &
    wait $! || rc=$?
    if [[ $rc -eq 0 ]]; then
        passed=$((passed + 1))
        printf 'PASS  %s\n' "$name"
        [[ -n "${VERBOSE:-}" ]] && sed 's/^/      /' "$log"
    elif [[ $rc -eq 77 ]]; then
        skipped=$((skipped + 1))
        printf 'SKIP  %s (%s)\n' "$name" "$(tail -n 1 "$log")"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s (exit %d)\n' "$name" "$rc"
        tail -n 60 "$log" | sed 's/^/      /'
    fi
    return 0
}

is_root() { [[ "$(id -u)" = 0 ]]; }

# First line of a command's output (no `| head`: with pipefail, SIGPIPE would fail it).
first_line() {
    local out
    out="$("$@" 2>&1)"
    echo "${out%%$'\n'*}"
}

# Runs a PostgreSQL server binary as the postgres OS user when we are root.
pg_as() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }

wait_http() { # URL CODE SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        [[ "$(http_code "$1")" = "$2" ]] && return 0
        sleep 0.1
    done
    echo "timeout: $1 did not answer $2 within $3s (last: $(http_code "$1"))"
    return 1
}

# ------------------------------------------------------------------ tools

setup_tools() {
    ensure_venv "$VENV" tests/deploy/requirements.txt deploy/compose/importer/requirements.txt
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        apt_install prometheus
    fi
    if ! command -v psql >/dev/null || ! command -v pgbench >/dev/null || [[ ! -x "$PG_BIN/initdb" ]]; then
        apt_install postgresql-15 postgresql-client-15
    fi
    [[ -x "$PGSIDECAR_BIN" ]] || {
        echo "$PGSIDECAR_BIN not found: run cargo build --release or set PGSIDECAR_BIN"
        return 1
    }
    "$VENV/bin/yamllint" --version
    "$VENV/bin/kubernetes-validate" --version
    "$VENV/bin/hadolint" --version
    "$VENV/bin/check-jsonschema" --version
    first_line promtool --version
    if command -v kubectl >/dev/null; then
        first_line kubectl version --client
    else
        echo "kubectl: not installed (not in Debian/Ubuntu's archive); kustomize builds use tests/deploy/kustomize_lite.py"
    fi
    "$PGSIDECAR_BIN" --version
}

# ------------------------------------------------------------------ static checks

yaml_lint() {
    "$VENV/bin/yamllint" --strict -c deploy/.yamllint deploy proxy.yaml tests/deploy
}

shell_lint() {
    "$VENV/bin/shellcheck" -x tests/deploy/validate.sh tests/setup-env.sh tests/run-all.sh tests/drivers/run.sh
}

kustomize_build() {
    if command -v kubectl >/dev/null; then
        kubectl kustomize deploy/kubernetes >"$WORK/k8s-native.yaml"
        kubectl kustomize deploy/kubernetes/legacy >"$WORK/k8s-legacy.yaml"
    else
        "$PY" tests/deploy/kustomize_lite.py deploy/kubernetes >"$WORK/k8s-native.yaml"
        "$PY" tests/deploy/kustomize_lite.py deploy/kubernetes/legacy >"$WORK/k8s-legacy.yaml"
    fi
    grep -c '^kind:' "$WORK/k8s-native.yaml" "$WORK/k8s-legacy.yaml"
}

# kubernetes-validate only warns about kinds it has no schema for: that is accepted for
# the PodMonitor and PrometheusRule CRDs (checked by check_deploy.py and helm_check.py)
# and nothing else.
k8s_validate() { # VARIANT VERSIONS...
    local variant="$1" v out
    shift
    for v in "$@"; do
        out="$("$VENV/bin/kubernetes-validate" --strict -k "$v" "$WORK/k8s-$variant.yaml" 2>&1)" || {
            echo "$out"
            return 1
        }
        echo "$out"
        if grep -vE 'kind (PodMonitor|PrometheusRule) with api version monitoring.coreos.com/v1' <<<"$out" |
            grep -E "WARN|ERROR|Couldn't find schema"; then
            echo "unexpected warning for kubernetes $v"
            return 1
        fi
    done
}

# The Helm chart, through Helm's own Go SDK (helm-python-sdk; no helm binary needed):
# strict lint, then `helm template` of the native variant (defaults) and of the legacy
# variant with the NetworkPolicy on, each validated like the kustomize output and
# checked against the chart's promises.
HELM="$PY tests/deploy/helm_check.py"
helm_lint() {
    $HELM lint deploy/helm/pgsidecar
}

helm_template() {
    $HELM template deploy/helm/pgsidecar >"$WORK/k8s-helm-native.yaml"
    $HELM template deploy/helm/pgsidecar \
        --set-json '{"sidecar": {"native": false}, "networkPolicy": {"enabled": true}}' >"$WORK/k8s-helm-legacy.yaml"
    grep -c '^kind:' "$WORK/k8s-helm-native.yaml" "$WORK/k8s-helm-legacy.yaml"
    k8s_validate helm-native "${K8S_NATIVE_VERSIONS[@]}"
    k8s_validate helm-legacy "${K8S_LEGACY_VERSIONS[@]}"
    $HELM policy "$WORK/k8s-helm-native.yaml" --bin "$PGSIDECAR_BIN" --variant native
    $HELM policy "$WORK/k8s-helm-legacy.yaml" --bin "$PGSIDECAR_BIN" --variant legacy
}

# The kustomize PrometheusRule carries alerts.yml as it is; the NetworkPolicy example is
# a valid object.
monitoring_objects() {
    "$PY" - <<'EOF'
import sys, yaml
rule = yaml.safe_load(open("deploy/kubernetes/common/prometheusrule.yaml"))
alerts = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
ok = rule["spec"] == alerts
print("deploy/kubernetes/common/prometheusrule.yaml matches alerts.yml:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
    cp deploy/kubernetes/examples/networkpolicy.yaml "$WORK/k8s-netpol.yaml"
    k8s_validate netpol "${K8S_LEGACY_VERSIONS[@]}"
}

manifest_policy() { # VARIANT
    $CHECK manifests "$WORK/k8s-$1.yaml" --bin "$PGSIDECAR_BIN" --variant "$1"
}

# The root proxy.yaml, and the image's baked config with the environment the compose
# file gives the pgsidecar service (so the two cannot drift apart).
config_check() {
    APP_PASSWORD=x PGSIDECAR_UPSTREAM_PASSWORD=x "$PGSIDECAR_BIN" check --config proxy.yaml
    "$PY" - "$PGSIDECAR_BIN" <<'EOF'
import os, re, subprocess, sys, yaml
svc = yaml.safe_load(open("deploy/compose/docker-compose.yml"))["services"]["pgsidecar"]
env = {k: v for k, v in os.environ.items() if not k.startswith("PGSIDECAR_")}
for k, v in svc["environment"].items():
    env[k] = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
r = subprocess.run([sys.argv[1], "check", "--config", "deploy/docker/proxy.yaml"], env=env)
print("deploy/docker/proxy.yaml with the compose environment:", "ok" if r.returncode == 0 else "FAILED")
sys.exit(r.returncode)
EOF
}

prom_rules() {
    promtool check rules deploy/prometheus/alerts.yml
    promtool check config deploy/prometheus/prometheus.yml
}

prom_rule_tests() {
    promtool test rules tests/deploy/alerts_test.yml
}

compose_schema() {
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml
    $CHECK compose deploy/compose/docker-compose.yml
}

# A real Compose implementation parses, interpolates and validates the file (no daemon
# needed): the v2 plugin if present, else Debian's docker-compose 1.29 (installed when
# root), which predates the top-level `name:` key, so it reads the file without it
# (from the compose directory, so relative build contexts and mounts resolve).
compose_config() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -f deploy/compose/docker-compose.yml config --quiet
        echo "docker compose config: ok"
        return 0
    fi
    command -v docker-compose >/dev/null || apt_install docker-compose >/dev/null || true
    if ! command -v docker-compose >/dev/null; then
        echo "neither docker compose (v2) nor docker-compose (v1) is available"
        return 77
    fi
    first_line docker-compose version
    (cd deploy/compose && grep -v '^name:' docker-compose.yml |
        docker-compose -p pgsidecar-demo -f - config --quiet)
    echo "docker-compose config: ok"
}

dockerfile_lint() {
    "$VENV/bin/hadolint" Dockerfile deploy/compose/importer/Dockerfile
    "$PY" tests/deploy/dockerfile_check.py Dockerfile .dockerignore
}

# The runtime image is distroless/cc: glibc, libgcc_s, libstdc++ and OpenSSL 3, nothing
# else. A dependency that links another shared library would build but not start.
binary_libs() {
    local libs bad
    libs="$(ldd "$PGSIDECAR_BIN" | awk '{print $1}')"
    echo "$libs"
    bad="$(grep -vE '^(linux-vdso\.so\.1|(/[^ ]*/)?ld-linux[-a-z0-9_.]*\.so\.[0-9]+|lib(c|m|dl|pthread|rt|gcc_s|stdc\+\+|ssl|crypto)\.so\.[0-9]+)$' <<<"$libs" || true)"
    if [[ -n "$bad" ]]; then
        echo "shared libraries that gcr.io/distroless/cc-debian12 does not have: $bad"
        return 1
    fi
}

importer_syntax() {
    "$PY" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' \
        deploy/compose/importer/import_molecules.py
    grep -q '^psycopg\[binary\]==' deploy/compose/importer/requirements.txt
}

# ------------------------------------------------------------------ live stack

PG_PORT="$(free_port)"
PROXY_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
PROM_PORT="$(free_port)"
ADMIN="http://127.0.0.1:$ADMIN_PORT"
export PGPASSWORD=app

start_postgres() {
    mkdir -p "$WORK/pg"
    echo postgres >"$WORK/pg/pwfile"
    is_root && chown -R postgres: "$WORK/pg"
    pg_as "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres -A scram-sha-256 \
        --pwfile="$WORK/pg/pwfile" >"$WORK/pg/initdb.log"
    pg_as "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pg -c max_connections=50" start
    PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qc 'CREATE DATABASE app'
    # The compose init script, as the postgres image's entrypoint runs it.
    PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d app -v ON_ERROR_STOP=1 -q \
        -f deploy/compose/initdb/01-molecules.sql
}

write_proxy_config() { # FILE POOL_SIZE
    cat >"$1" <<EOF
listen: 127.0.0.1:$PROXY_PORT
admin_listen: 127.0.0.1:$ADMIN_PORT
pool_mode: transaction
upstream:
  host: 127.0.0.1
  port: $PG_PORT
  user: app
  password: \${PGSIDECAR_UPSTREAM_PASSWORD}
users:
  - name: app
    password: \${PGSIDECAR_CLIENT_PASSWORD}
  # Logs in upstream with a wrong password: the refused-login metric and alert.
  - name: badlogin
    password: \${PGSIDECAR_CLIENT_PASSWORD}
    server_user: app
    server_password: not-the-password
databases:
  - name: app
pool:
  size: $2
$("$PY" -c 'import sys, yaml; print(yaml.safe_dump({"limits": yaml.safe_load(open(sys.argv[1]))["limits"]}), end="")' deploy/kubernetes/common/proxy.yaml)
admin:
  token: \${PGSIDECAR_ADMIN_TOKEN}
  shutdown_delay: 2s
  shutdown_timeout: 5s
logging:
  format: json
EOF
}

start_proxy() {
    write_proxy_config "$WORK/proxy.yaml" 5
    PGSIDECAR_UPSTREAM_PASSWORD=app PGSIDECAR_CLIENT_PASSWORD=app PGSIDECAR_ADMIN_TOKEN="$TOKEN" \
        nohup "$PGSIDECAR_BIN" --config "$WORK/proxy.yaml" >>"$WORK/proxy.log" 2>&1 &
    echo $! >"$WORK/proxy.pid"
    wait_http "$ADMIN/startupz" 200 20
    wait_http "$ADMIN/readyz" 200 5
    wait_http "$ADMIN/livez" 200 5
    curl -sf "$ADMIN/startupz"
    touch "$WORK/proxy.started"
}

# Live checks after the start fail fast, instead of timing out one by one.
need_proxy() {
    [[ -e "$WORK/proxy.started" ]] || {
        echo "pgsidecar did not start (see the checks above)"
        return 1
    }
}

run_importer() { # extra env...
    env "$@" DATABASE_URL="postgresql://app:app@127.0.0.1:$PROXY_PORT/app" \
        PGSIDECAR_ADMIN_URL="$ADMIN" IMPORT_ROWS=3000 IMPORT_BATCH=500 IMPORT_WAIT_TIMEOUT=20 \
        "$PY" deploy/compose/importer/import_molecules.py
}

traffic() {
    need_proxy
    # The example importer: COPY into a staging table + upsert, then executemany upserts.
    run_importer IMPORT_ROUNDS=2 | tee "$WORK/importer.log"
    grep -q '"event": "import_done", "rows": 3000, "updated": 3000' "$WORK/importer.log"
    # Concurrency beyond the pool size, so clients queue for a server connection.
    echo 'SELECT count(*) FROM molecules WHERE mol_weight > 100;' >"$WORK/bench.sql"
    pgbench -h 127.0.0.1 -p "$PROXY_PORT" -U app -n -c 12 -j 2 -T 3 -f "$WORK/bench.sql" app |
        grep -E 'transactions actually processed|tps|failed'
    # An error a client sees (SQLSTATE class 22), counted in pgsidecar_errors_total.
    if psql "host=127.0.0.1 port=$PROXY_PORT user=app dbname=app" -qc 'SELECT 1/0' 2>"$WORK/err.txt"; then
        echo "SELECT 1/0 did not fail"
        return 1
    fi
    grep -q 'division by zero' "$WORK/err.txt"
    # The proxy's own login refused (pgsidecar_upstream_login_failures_total{sqlstate}).
    if psql "host=127.0.0.1 port=$PROXY_PORT user=badlogin dbname=app" -qc 'SELECT 1' 2>"$WORK/err.txt"; then
        echo "a login with a wrong server_password did not fail"
        return 1
    fi
    grep -q "the proxy's own login to PostgreSQL as role \"app\" failed" "$WORK/err.txt"
    # A successful and a failed reload (pgsidecar_config_reloads_total{result}).
    curl -sf -X POST -H "Authorization: Bearer $TOKEN" "$ADMIN/api/reload"
    cp "$WORK/proxy.yaml" "$WORK/proxy.yaml.good"
    echo 'pool: {size: 0}' >>"$WORK/proxy.yaml"
    [[ "$(http_code -X POST -H "Authorization: Bearer $TOKEN" "$ADMIN/api/reload")" = 422 ]]
    cp "$WORK/proxy.yaml.good" "$WORK/proxy.yaml"
    curl -sf -X POST -H "Authorization: Bearer $TOKEN" "$ADMIN/api/reload"
    # Mutating endpoints want the token.
    [[ "$(http_code -X POST "$ADMIN/api/reload")" = 401 ]]
    curl -sf "$ADMIN/api/pools" >"$WORK/pools.json"
    "$PY" -m json.tool "$WORK/pools.json"
}

scrape() {
    need_proxy
    curl -sf "$ADMIN/metrics" >"$WORK/metrics.txt"
    grep -c '^pgsidecar_' "$WORK/metrics.txt"
    promtool check metrics <"$WORK/metrics.txt"
}

metrics_used() {
    need_proxy
    $CHECK metrics-used --scrape "$WORK/metrics.txt" \
        --dashboard deploy/grafana/pgsidecar-dashboard.json --alerts deploy/prometheus/alerts.yml
}

memory_fits() {
    need_proxy
    $CHECK rss --pid "$(cat "$WORK/proxy.pid")" --manifests "$WORK/k8s-native.yaml"
}

# The Kubernetes limits' worst case, measured: one 100 MB query under the ConfigMap's
# limits (the live proxy runs with them); the peak RSS must stay under the memory limit.
big_query() {
    need_proxy
    "$PY" tests/deploy/big_query.py "postgresql://app:app@127.0.0.1:$PROXY_PORT/app"
    $CHECK rss --pid "$(cat "$WORK/proxy.pid")" --manifests "$WORK/k8s-native.yaml" --against limit
}

# A real Prometheus scraping the live proxy every second, with the alert rules loaded.
prometheus_queries() {
    need_proxy
    mkdir -p "$WORK/prom"
    cp deploy/prometheus/alerts.yml "$WORK/prom/alerts.yml"
    cat >"$WORK/prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: pgsidecar
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
    promtool check config "$WORK/prom/prometheus.yml"
    nohup prometheus --config.file="$WORK/prom/prometheus.yml" --storage.tsdb.path="$WORK/prom/data" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prom/prometheus.log" 2>&1 &
    echo $! >"$WORK/prometheus.pid"
    wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 200 30
    # Traffic while it scrapes, so rates and quantiles have data.
    pgbench -h 127.0.0.1 -p "$PROXY_PORT" -U app -n -c 8 -j 2 -T 6 -f "$WORK/bench.sql" app >/dev/null
    sleep 2
    $CHECK queries --prom "http://127.0.0.1:$PROM_PORT" \
        --dashboard deploy/grafana/pgsidecar-dashboard.json --alerts deploy/prometheus/alerts.yml
}

# The legacy Job's contract: the importer POSTs /quitquitquit when done and the sidecar
# exits 0 on its own.
quit_on_exit() {
    need_proxy
    local pid i
    pid="$(cat "$WORK/proxy.pid")"
    run_importer PGSIDECAR_QUIT_ON_EXIT=true PGSIDECAR_ADMIN_TOKEN="$TOKEN" | tee "$WORK/importer-quit.log"
    grep -q '"event": "sidecar_quit", "status": 200' "$WORK/importer-quit.log"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "pgsidecar still running 10s after /quitquitquit"
        return 1
    fi
    grep -q 'shutdown complete' "$WORK/proxy.log"
    rm -f "$WORK/proxy.pid"
}

# What terminationGracePeriodSeconds and the readiness probe rely on: on SIGTERM
# /readyz turns 503 at once, new clients are still accepted during shutdown_delay,
# and the process exits 0 within shutdown_delay + shutdown_timeout.
sigterm_drain() {
    local pid start rc=0
    need_proxy
    start_proxy >/dev/null
    pid="$(cat "$WORK/proxy.pid")"
    start=$SECONDS
    kill -TERM "$pid"
    wait_http "$ADMIN/readyz" 503 2
    [[ "$(psql "host=127.0.0.1 port=$PROXY_PORT user=app dbname=app" -Atqc 'SELECT 42')" = 42 ]]
    echo "still accepting clients during shutdown_delay: ok"
    wait "$pid" || rc=$?
    rm -f "$WORK/proxy.pid"
    echo "exit code $rc after $((SECONDS - start))s"
    [[ $rc -eq 0 && $((SECONDS - start)) -le 9 ]]
}

# ------------------------------------------------------------------ run

echo "pgsidecar deploy validation (binary: $PGSIDECAR_BIN, work: $WORK)"
check "tools: venv (yamllint, shellcheck, kubernetes-validate, hadolint, check-jsonschema, psycopg), promtool, kubectl, PostgreSQL" setup_tools
check "yamllint deploy/ proxy.yaml tests/deploy/" yaml_lint
check "shellcheck validate.sh, setup-env.sh, run-all.sh, drivers/run.sh" shell_lint
check "kustomize build deploy/kubernetes and deploy/kubernetes/legacy" kustomize_build
check "kubernetes-validate native sidecar variant (k8s ${K8S_NATIVE_VERSIONS[*]}, strict)" \
    k8s_validate native "${K8S_NATIVE_VERSIONS[@]}"
check "kubernetes-validate legacy variant (k8s ${K8S_LEGACY_VERSIONS[*]}, strict)" \
    k8s_validate legacy "${K8S_LEGACY_VERSIONS[@]}"
check "manifest policy: native sidecar variant" manifest_policy native
check "manifest policy: legacy variant" manifest_policy legacy
check "Helm chart: helm lint --strict (Helm's Go SDK via helm-python-sdk)" helm_lint
check "Helm chart: helm template native + legacy/NetworkPolicy, kubernetes-validate, chart policy" helm_template
check "PrometheusRule matches alerts.yml; NetworkPolicy example validates" monitoring_objects
check "pgsidecar check: proxy.yaml and the image's config with the compose env" config_check
check "promtool check rules/config" prom_rules
check "promtool test rules tests/deploy/alerts_test.yml" prom_rule_tests
check "grafana dashboard structure" "$PY" tests/deploy/check_deploy.py dashboard deploy/grafana/pgsidecar-dashboard.json
check "compose file: compose-spec schema, mounted files and build contexts" compose_schema
check "docker compose config (v2 plugin, else docker-compose v1)" compose_config
check "Dockerfiles: hadolint + project checklist" dockerfile_lint
check "release binary links only what distroless/cc provides" binary_libs
check "example importer compiles, psycopg pinned" importer_syntax
check "live: PostgreSQL 15 with deploy/compose/initdb" start_postgres
check "live: pgsidecar starts (/startupz, /readyz, /livez)" start_proxy
check "live: importer (COPY + executemany upserts), pgbench, errors, reloads" traffic
check "live: scrape /metrics, promtool check metrics" scrape
check "live: every pgsidecar_* metric in dashboard and alerts exists in the scrape" metrics_used
check "live: sidecar memory fits the manifests' requests" memory_fits
check "live: a 100 MB query under the manifests' limits stays under their memory limit" big_query
check "live: Prometheus evaluates every dashboard query and alert rule" prometheus_queries
check "live: importer's POST /quitquitquit stops the sidecar (legacy Job)" quit_on_exit
check "live: SIGTERM drain (readiness 503, still accepting, exit 0)" sigterm_drain

echo "deploy: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
