#!/usr/bin/env bash
# Run the conformance suite (tests/test_conformance.py) on other PKCS#11 modules,
# each on a throwaway token whose daemons this script starts and stops by PID:
#
#   scripts/conformance.sh [opencryptoki] [tpm2] [p11-kit-proxy] [p11-kit-client] [nss]
#
# No argument: all five. SoftHSM2 itself (and NetHSM) run in scripts/test.sh.
# opencryptoki and p11-kit-proxy run in a private mount/IPC namespace (root):
# the first keeps its state at fixed system paths, the second reads p11-kit's
# system module config, replaced there by one naming SoftHSM2 only.
# Prints the seconds each module took.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
modules=${*:-opencryptoki tpm2 p11-kit-proxy p11-kit-client nss}
pytest=(.venv/bin/python -m pytest tests/test_conformance.py -q -p no:cacheprovider -k "not nethsm and not replicas")
work=$(mktemp -d /tmp/hsmbridge-conformance-XXXXXX)
trap 'for d in "$work"/*/; do softhsm/stop-daemons.sh "$d"; done; rm -rf "$work"' EXIT
failed=""

in_namespace() {  # run "$@" in a private mount + IPC namespace
    unshare --mount --ipc --propagation private -- "$@"
}

run_one() {
    local module=$1 dir="$work/$1"
    mkdir -p "$dir"
    export HSMBRIDGE_TEST_TOKEN=$module
    case $module in
    opencryptoki)
        in_namespace bash -c '
            set -euo pipefail
            trap "softhsm/stop-daemons.sh $0" EXIT
            env_=$(softhsm/make-opencryptoki-token.sh "$0" conformance 87651234) || exit 1; eval "$env_"
            "${@}"' "$dir" "${pytest[@]}"
        ;;
    tpm2)
        (
            env_=$(softhsm/make-tpm2-token.sh "$dir" conformance 1234) || exit 1; eval "$env_"
            "${pytest[@]}"
        )
        ;;
    p11-kit-proxy)
        in_namespace bash -c '
            set -euo pipefail
            env_=$(softhsm/make-token.sh "$0/softhsm" conformance 1234) || exit 1; eval "$env_"
            mkdir -p "$0/p11-kit-modules"
            printf "module: %s\n" "$(realpath /usr/lib/softhsm/libsofthsm2.so)" \
                > "$0/p11-kit-modules/softhsm2.module"
            mount --bind "$0/p11-kit-modules" /usr/share/p11-kit/modules
            [ ! -d /etc/pkcs11/modules ] || mount --bind "$0/p11-kit-modules" /etc/pkcs11/modules
            proxy=/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/p11-kit-proxy.so
            export HSMBRIDGE_HSM="pkcs11:token=conformance?module-path=$proxy"
            "${@}"' "$dir" "${pytest[@]}"
        ;;
    p11-kit-client)
        (
            env_=$(softhsm/make-token.sh "$dir/softhsm" conformance 1234) || exit 1; eval "$env_"
            env_=$(softhsm/start-p11-kit-server.sh "$dir" /usr/lib/softhsm/libsofthsm2.so conformance) || exit 1; eval "$env_"
            "${pytest[@]}"
        )
        ;;
    nss)
        (
            env_=$(softhsm/make-nss-token.sh "$dir" 1234) || exit 1; eval "$env_"
            "${pytest[@]}"
        )
        ;;
    *)
        echo "unknown module $module (opencryptoki tpm2 p11-kit-proxy p11-kit-client nss)" >&2
        return 2
        ;;
    esac
}

for module in $modules; do
    echo "== conformance on $module"
    start=$(date +%s)
    if run_one "$module"; then status=ok; else status=FAILED; failed="$failed $module"; fi
    softhsm/stop-daemons.sh "$work/$module"
    echo "== $module: $status in $(( $(date +%s) - start ))s"
done
cd "$here"
[ -z "$failed" ] || { echo "conformance failed on:$failed" >&2; exit 1; }
