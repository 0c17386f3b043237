#!/usr/bin/env bash
# Stop the daemons a make-*-token.sh started in DIR: the PIDs in DIR/pids,
# newest first, each by its PID (TERM, then KILL after 5 s).
#
#   softhsm/stop-daemons.sh /tmp/tpm
set -uo pipefail
dir=${1:?usage: stop-daemons.sh DIR}
[ -f "$dir/pids" ] || exit 0
for pid in $(tac "$dir/pids"); do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
done
rm -f "$dir/pids"
