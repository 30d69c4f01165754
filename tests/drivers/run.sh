#!/usr/bin/env bash
# Driver compatibility suite for pgsidecar (asyncpg, psycopg 3, psycopg2) against a
# throwaway PostgreSQL 15 cluster, in transaction and session pool modes.
#
# Builds nothing: expects target/release/pgsidecar (or $PGSIDECAR_BIN).
# Installs tests/drivers/requirements.txt into target/test-venv (tests/setup-env.sh).
# Extra arguments go to pytest, e.g.  tests/drivers/run.sh -m "not proxy_bug" -k asyncpg
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root" || exit 2
# The driver suite's virtual environment (target/test-venv), created and filled here
# when missing; the system Python is never installed into.
# shellcheck source=SCRIPTDIR/../setup-env.sh
. "$root/tests/setup-env.sh"
PY="$TEST_VENV/bin/python"
ensure_venv "$TEST_VENV" "$here/requirements.txt" || exit 2

"$PY" -m pytest tests/drivers -q "$@"
exit $?
