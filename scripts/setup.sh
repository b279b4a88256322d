#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: a virtualenv in .venv with the lab installed,
# and the Go toolchain for the goroutine reference backend (Debian's golang-go, as root);
# iproute2's `ip` for the tests that put hosts in network namespaces (as root);
# redis-server's binary for the shared rate limit's tests (as root; its service left stopped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
if ! command -v go >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Go (apt-get install golang-go) for the go backend..." >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq golang-go >/dev/null \
            || echo "setup: could not install Go; the go backend will be reported unavailable" >&2
    else
        echo "setup: no Go toolchain and not root: the go backend is unavailable (apt-get install golang-go)" >&2
    fi
fi
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing iproute2 (apt-get install iproute2) for the network-namespace tests..." >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq iproute2 >/dev/null \
        || echo "setup: could not install iproute2; the network-namespace tests will skip" >&2
fi
# redis-server for the shared rate limit's tests, which start their own on a free port: only the binary
# is needed, so the system service the package brings is stopped and disabled at once.
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing redis-server (apt-get install redis-server) for the shared rate-limit tests..." >&2
    if apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null; then
        service redis-server stop >/dev/null 2>&1 || true
        systemctl --no-reload disable redis-server >/dev/null 2>&1 || update-rc.d redis-server disable >/dev/null 2>&1 || true
    else
        echo "setup: could not install redis-server; the shared rate-limit tests will fail" >&2
    fi
fi
