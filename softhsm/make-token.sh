#!/usr/bin/env bash
# Make a throwaway SoftHSM2 token in DIR and print the environment to export.
#
#   eval "$(softhsm/make-token.sh /tmp/hsm ci 1234)"
#   hsmbridge --hsm "$HSMBRIDGE_HSM" list
#
# Idempotent: an existing token with the same label in DIR is kept.
set -euo pipefail
dir=${1:?usage: make-token.sh DIR [LABEL] [PIN] [SO_PIN]}
label=${2:-hsmbridge}
pin=${3:-1234}
so_pin=${4:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
module=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
here=$(cd "$(dirname "$0")" && pwd)

command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found: apt-get install softhsm2" >&2; exit 1; }
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.in" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if ! softhsm2-util --show-slots 2>/dev/null | grep -qE "Label:[[:space:]]*$label[[:space:]]*$"; then
    softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
fi
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
echo "export HSMBRIDGE_PIN=$pin"
echo "export HSMBRIDGE_HSM='pkcs11:token=$label?module-path=$module'"
