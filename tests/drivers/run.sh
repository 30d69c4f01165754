#!/usr/bin/env bash
# Driver compatibility suite for pgsidecar (asyncpg, psycopg 3, psycopg2) against a
# throwaway PostgreSQL 15 cluster, in transaction and session pool modes.
#
# Builds nothing: expects target/release/pgsidecar (or $PGSIDECAR_BIN).
# Installs tests/drivers/requirements.txt quietly when a pinned package is missing.
# Extra arguments go to pytest, e.g.  tests/drivers/run.sh -m "not proxy_bug" -k asyncpg
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root" || exit 2
PY="${PYTHON:-python3}"

if ! "$PY" - "$here/requirements.txt" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    name = name.split("[", 1)[0]
    try:
        if version(name) != want:
            ok = False
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PYEOF
then
    echo "tests/drivers: installing requirements" >&2
    "$PY" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt" || exit 2
fi

"$PY" -m pytest tests/drivers -q "$@"
exit $?
