#!/usr/bin/env bash
# Make a throwaway opencryptoki software token (swtok) in DIR and print the
# environment to export. opencryptoki keeps its state at fixed system paths
# (/var/lib/opencryptoki, /run/pkcsslotd.socket, /var/lock/opencryptoki,
# shared memory), so this runs only inside a private mount and IPC namespace,
# where those paths are bind-mounted from DIR and nothing of the machine's own
# opencryptoki is touched:
#
#   unshare --mount --ipc --propagation private -- bash -c '
#       eval "$(softhsm/make-opencryptoki-token.sh /tmp/ock ci 12345678)"
#       hsmbridge --hsm "$HSMBRIDGE_HSM" list
#       softhsm/stop-daemons.sh /tmp/ock'
#
# pkcsslotd runs in the foreground by PID (DIR/pids). PINs are 4-8 characters.
# apt-get install opencryptoki
set -euo pipefail
dir=${1:?usage: make-opencryptoki-token.sh DIR [LABEL] [PIN] [SO_PIN]}
label=${2:-hsmbridge}
pin=${3:-12345678}
so_pin=${4:-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
module=/usr/lib/$multiarch/pkcs11/libopencryptoki.so

command -v pkcsslotd >/dev/null || { echo "pkcsslotd not found: apt-get install opencryptoki" >&2; exit 1; }
if [ "$(readlink /proc/self/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ]; then
    echo "run me inside 'unshare --mount --ipc --propagation private': I bind-mount over" \
         "opencryptoki's system paths" >&2
    exit 1
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/lib/swtok/TOK_OBJ" "$dir/lock/swtok" "$dir/log" "$dir/etc"
chgrp -R pkcs11 "$dir/lib" "$dir/lock" "$dir/log"
chmod -R 770 "$dir/lib" "$dir/lock" "$dir/log"
printf 'version opencryptoki-3.1\nslot 0\n{\nstdll = libpkcs11_sw.so\ntokname = swtok\n}\n' \
    > "$dir/etc/opencryptoki.conf"
mount --bind "$dir/lib" /var/lib/opencryptoki
mount --bind "$dir/etc/opencryptoki.conf" /etc/opencryptoki/opencryptoki.conf
mount -t tmpfs -o mode=0755 tmpfs /run          # /var/run and /var/lock live here
mkdir -p /run/lock/opencryptoki /var/log/opencryptoki
mount --bind "$dir/lock" /run/lock/opencryptoki
mount --bind "$dir/log" /var/log/opencryptoki

pkcsslotd -f >"$dir/pkcsslotd.log" 2>&1 &
echo $! >> "$dir/pids"
for _ in $(seq 100); do [ -S /run/pkcsslotd.socket ] && break; sleep 0.1; done
[ -S /run/pkcsslotd.socket ] || { echo "pkcsslotd did not start; see $dir/pkcsslotd.log" >&2; exit 1; }

# swtok ships with SO PIN 87654321 and no user PIN.
printf '%s\n' "$label" | pkcsconf -c 0 -I -S 87654321 >/dev/null
pkcsconf -c 0 -P -S 87654321 -n "$so_pin" >/dev/null
pkcsconf -c 0 -u -S "$so_pin" -n "$pin" >/dev/null
echo "export HSMBRIDGE_PIN=$pin"
echo "export HSMBRIDGE_HSM='pkcs11:token=$label?module-path=$module'"
