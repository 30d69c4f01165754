#!/usr/bin/env bash
# Sourced by tests/run-all.sh, tests/drivers/run.sh and tests/deploy/validate.sh: the
# Python virtual environments the suites use, created on first use under target/
# (target/test-venv for the driver matrix, target/deploy-venv for the deployment tools
# and the example importer, which pins another psycopg). The system Python is never
# pip-installed into (Debian 12 / Ubuntu 24.04 refuse it, PEP 668); apt runs only for
# packages the machine lacks, with --no-install-recommends, as root or through sudo.

_setup_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TEST_VENV="${PGSIDECAR_TEST_VENV:-$_setup_root/target/test-venv}"
export DEPLOY_VENV="${PGSIDECAR_DEPLOY_VENV:-$_setup_root/target/deploy-venv}"

# as_root CMD...: runs CMD as root (directly, or through sudo); fails with a message
# naming what was wanted when neither is possible.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        echo "needs root to run: $*  (run it yourself, or run the tests as root or with sudo)" >&2
        return 1
    fi
}

_apt_updated=0
# apt_install PKG...: installs Debian/Ubuntu packages without recommended ones.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "missing: $* (no apt-get here; install the equivalent packages)" >&2
        return 1
    fi
    if [ "$_apt_updated" = 0 ]; then
        as_root apt-get update -qq || return 1
        _apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_venv DIR REQUIREMENTS...: creates the venv DIR (installing python3-venv when
# Debian lacks ensurepip) and installs the pinned requirements files into it.
ensure_venv() {
    local venv="$1"
    shift
    if [ ! -x "$venv/bin/python" ]; then
        command -v python3 >/dev/null || apt_install python3 || return 1
        local err
        if ! err="$(python3 -m venv "$venv" 2>&1)"; then
            rm -rf "$venv"
            local minor
            minor="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            echo "python3 -m venv $venv failed: ${err##*$'\n'}" >&2
            echo "(Debian ships ensurepip separately): installing python3-venv" >&2
            apt_install python3-venv || apt_install "python$minor-venv" || {
                echo "cannot create a Python virtual environment: install python3-venv" >&2
                return 1
            }
            python3 -m venv "$venv" || return 1
        fi
    fi
    local args=() f
    for f in "$@"; do args+=(-r "$f"); done
    # PIP_REQUIRE_VIRTUALENV=true: pip refuses to run outside a venv, so this line can
    # only ever install into ours.
    PIP_REQUIRE_VIRTUALENV=true "$venv/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}"
}
