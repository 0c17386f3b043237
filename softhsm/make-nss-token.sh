#!/usr/bin/env bash
# Make a throwaway NSS softokn database in DIR and print the environment to
# export. NSS's module needs C_Initialize arguments (its configdir); the URI
# carries them in the vendor attribute x-init-reserved.
#
#   eval "$(softhsm/make-nss-token.sh /tmp/nss 1234)"
#
# apt-get install libnss3-tools
set -euo pipefail
dir=${1:?usage: make-nss-token.sh DIR [PIN]}
pin=${2:-1234}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
module=/usr/lib/$multiarch/libsoftokn3.so
command -v certutil >/dev/null || { echo "certutil not found: apt-get install libnss3-tools" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ ! -f "$dir/cert9.db" ]; then
    (umask 077; printf '%s\n' "$pin" > "$dir/.pin")
    certutil -N -d "sql:$dir" -f "$dir/.pin"
    rm -f "$dir/.pin"
fi
init=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' \
    "configdir='sql:$dir' certPrefix='' keyPrefix='' secmod='secmod.db' flags=")
echo "export HSMBRIDGE_PIN=$pin"
echo "export HSMBRIDGE_HSM='pkcs11:token=NSS%20Certificate%20DB?module-path=$module&x-init-reserved=$init'"
