#!/usr/bin/env bash
# Make a throwaway tpm2-pkcs11 token on a software TPM in DIR and print the
# environment to export. Starts swtpm, a private D-Bus session bus and
# tpm2-abrmd on it (no systemd needed), each recorded by PID in DIR/pids;
# stop them with softhsm/stop-daemons.sh DIR.
#
#   eval "$(softhsm/make-tpm2-token.sh /tmp/tpm ci 1234)"
#   hsmbridge --hsm "$HSMBRIDGE_HSM" list
#
# apt-get install swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 \
#     libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus
set -euo pipefail
dir=${1:?usage: make-tpm2-token.sh DIR [LABEL] [PIN] [SO_PIN]}
label=${2:-hsmbridge}
pin=${3:-1234}
so_pin=${4:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
module=/usr/lib/$multiarch/pkcs11/libtpm2_pkcs11.so

for tool in swtpm tpm2-abrmd dbus-daemon tpm2_ptool; do
    command -v "$tool" >/dev/null || { echo "$tool not found; see the apt-get line in $0" >&2; exit 1; }
done
[ -f "$module" ] || { echo "$module not found: apt-get install libtpm2-pkcs11-1" >&2; exit 1; }
mkdir -p "$dir/state" "$dir/store"
dir=$(cd "$dir" && pwd)
started() { echo "$1" >> "$dir/pids"; }
wait_for() {  # wait_for WHAT TEST...
    local what=$1; shift
    for _ in $(seq 100); do "$@" 2>/dev/null && return 0; sleep 0.1; done
    echo "$what did not come up; see $dir/*.log" >&2; exit 1
}

swtpm socket --tpm2 --tpmstate "dir=$dir/state" \
    --server "type=unixio,path=$dir/swtpm.sock" --ctrl "type=unixio,path=$dir/swtpm.sock.ctrl" \
    --flags not-need-init,startup-clear >"$dir/swtpm.log" 2>&1 &
started $!
wait_for swtpm test -S "$dir/swtpm.sock"

dbus-daemon --config-file=/usr/share/dbus-1/session.conf --nofork --print-address=3 \
    3>"$dir/dbus.address" >"$dir/dbus.log" 2>&1 &
started $!
wait_for dbus-daemon test -s "$dir/dbus.address"
bus=$(head -1 "$dir/dbus.address")

DBUS_SESSION_BUS_ADDRESS=$bus tpm2-abrmd --allow-root --session \
    --tcti="swtpm:path=$dir/swtpm.sock" >"$dir/tpm2-abrmd.log" 2>&1 &
started $!
export DBUS_SESSION_BUS_ADDRESS=$bus TPM2TOOLS_TCTI="tabrmd:bus_type=session"
wait_for tpm2-abrmd tpm2_getrandom 4 -o /dev/null

if [ ! -s "$dir/store/tpm2_pkcs11.sqlite3" ]; then
    tpm2_ptool init --path="$dir/store" >/dev/null
    tpm2_ptool addtoken --pid=1 --label="$label" --userpin="$pin" --sopin="$so_pin" \
        --path="$dir/store" >/dev/null
fi
echo "export DBUS_SESSION_BUS_ADDRESS='$bus'"
echo "export TPM2_PKCS11_TCTI='tabrmd:bus_type=session'"
echo "export TPM2_PKCS11_STORE=$dir/store"
echo "export HSMBRIDGE_PIN=$pin"
echo "export HSMBRIDGE_HSM='pkcs11:token=$label?module-path=$module'"
