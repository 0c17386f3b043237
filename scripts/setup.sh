#!/usr/bin/env bash
# Set up hsmbridge on a fresh Debian machine. Idempotent.
#   scripts/setup.sh          system packages + .venv with hsmbridge
#   scripts/setup.sh --test   the same plus the server and test extras
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[server,test]"

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
packages="softhsm2 opensc pkcs11-dump openssl gcc python3-venv python3-dev"
# --test: the other PKCS#11 modules the conformance suite runs on
# (scripts/conformance.sh), p11-kit, and OpenSSL's pkcs11 engine for the interop tests.
[ "${1:-}" = "--test" ] && packages="$packages opencryptoki swtpm swtpm-tools tpm2-tools \
    tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus \
    p11-kit p11-kit-modules libnss3 libnss3-tools libengine-pkcs11-openssl util-linux"
# the replica tests run a real PostgreSQL and HAProxy (tests/replica_fixtures.py)
[ "${1:-}" = "--test" ] && packages="$packages postgresql haproxy"
# zsh: the completion test loads the zsh script (it skips without zsh)
[ "${1:-}" = "--test" ] && packages="$packages zsh"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
.venv/bin/python -m pip install -q -e ".$extras"
# Build the native batch engine in place (the editable install does too; this
# makes a missing compiler visible instead of silently using the fallback).
.venv/bin/python setup.py -q build_ext --inplace
.venv/bin/python -c "import hsmbridge._native" \
    || echo "note: native engine not built; hsmbridge uses its pure-Python batch path" >&2
echo "hsmbridge is set up in .venv (activate with: . .venv/bin/activate)"
