#!/usr/bin/env bash
# Export one token of a module over a p11-kit server socket in DIR, for
# p11-kit-client.so (how containers and Flatpak reach host tokens), and print
# the environment to export. The server runs in the foreground by PID
# (DIR/pids); stop it with softhsm/stop-daemons.sh DIR.
#
#   eval "$(softhsm/make-token.sh /tmp/hsm ci 1234)"
#   eval "$(softhsm/start-p11-kit-server.sh /tmp/p11 /usr/lib/softhsm/libsofthsm2.so ci)"
#
# apt-get install p11-kit p11-kit-modules
set -euo pipefail
dir=${1:?usage: start-p11-kit-server.sh DIR PROVIDER-MODULE TOKEN-LABEL}
provider=${2:?provider module}
label=${3:?token label}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
client=/usr/lib/$multiarch/pkcs11/p11-kit-client.so
command -v p11-kit >/dev/null || { echo "p11-kit not found: apt-get install p11-kit" >&2; exit 1; }
[ -f "$client" ] || { echo "$client not found: apt-get install p11-kit-modules" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
p11-kit server -f -n "$dir/pkcs11.sock" --provider "$provider" "pkcs11:token=$label" \
    >"$dir/p11-kit-server.log" 2>&1 &
echo $! >> "$dir/pids"
for _ in $(seq 100); do [ -S "$dir/pkcs11.sock" ] && break; sleep 0.1; done
[ -S "$dir/pkcs11.sock" ] || { echo "p11-kit server did not start; see $dir/p11-kit-server.log" >&2; exit 1; }
echo "export P11_KIT_SERVER_ADDRESS=unix:path=$dir/pkcs11.sock"
echo "export HSMBRIDGE_HSM='pkcs11:token=$label?module-path=$client'"
