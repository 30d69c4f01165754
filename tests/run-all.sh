#!/usr/bin/env bash
# The one test command (README and CI): installs what the tests need on a fresh machine,
# then runs formatting and lint checks, the Rust suite against throwaway PostgreSQL
# clusters, the Python driver matrix, and the deployment validation.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
# as_root, apt_install (--no-install-recommends), ensure_venv, TEST_VENV, DEPLOY_VENV.
# shellcheck source=SCRIPTDIR/setup-env.sh
. tests/setup-env.sh

log "checking the Rust toolchain"
want_rust="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)"
if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust $want_rust or newer (https://rustup.rs)" >&2
    exit 1
fi
have_rust="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$want_rust" "$have_rust" | sort -V | head -1)" != "$want_rust" ]; then
    echo "rustc $have_rust is older than the crate's rust-version $want_rust: rustup update" >&2
    exit 1
fi
echo "rustc $have_rust (needs $want_rust or newer)"

find_pg_bin() {
    if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return; fi
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
    printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1
}

log "checking PostgreSQL server binaries"
if [ -z "$(find_pg_bin)" ] || [ ! -x "$(find_pg_bin)/initdb" ]; then
    apt_install postgresql postgresql-contrib
fi
PG_BIN="$(find_pg_bin)"
export PG_BIN
echo "PG_BIN=$PG_BIN"
id postgres >/dev/null 2>&1 || as_root useradd -r -M postgres
command -v pgbench >/dev/null || apt_install postgresql-contrib

command -v curl >/dev/null || apt_install curl ca-certificates

log "Python test dependencies, in the virtual environments $TEST_VENV and $DEPLOY_VENV"
ensure_venv "$TEST_VENV" tests/drivers/requirements.txt
ensure_venv "$DEPLOY_VENV" tests/deploy/requirements.txt deploy/compose/importer/requirements.txt

if [ -x tests/deploy/validate.sh ] && ! command -v promtool >/dev/null; then
    log "installing promtool (Debian package prometheus, without recommended packages)"
    apt_install prometheus || echo "promtool unavailable; deploy validation will say so"
fi

log "format, lint and structure (import cycles, file and function sizes)"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
python3 tests/check_structure.py src

log "building the release binary (driver and deploy suites run it)"
cargo build --release --quiet
export PGSIDECAR_BIN="$PWD/target/release/pgsidecar"

log "Rust unit and integration tests (real PostgreSQL clusters)"
cargo test --quiet -- --test-threads=2

log "Python driver matrix (psycopg 3, psycopg2, asyncpg) in transaction and session mode"
bash tests/drivers/run.sh

if [ -x tests/deploy/validate.sh ]; then
    log "deployment validation (yamllint, manifests, promtool, dashboard metrics)"
    bash tests/deploy/validate.sh
fi

log "all suites passed"
