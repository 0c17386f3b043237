"""A separate process that works on a key ring, for tests/test_rings_processes.py.

    python ring_worker.py rotate-loop URI RING        # rotate EC rings until killed
    python ring_worker.py sweep-loop URI RING         # rotate with no grace + sweep until killed
    python ring_worker.py rotate-at URI RING START    # one rotation at time.time() >= START
    python ring_worker.py watch URI RING SECONDS      # print the primary's version as it changes

The PIN comes from HSMBRIDGE_PIN (never argv); SOFTHSM2_CONF from the environment.
Each line printed is one JSON object, flushed at once.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import hsmbridge
from hsmbridge import EC


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str]) -> int:
    command, uri, name = argv[:3]
    for attempt in range(3):  # SoftHSM2 may fail C_GetTokenInfo while others write the token
        try:
            hsm = hsmbridge.open(uri)
            break
        except hsmbridge.HSMError:
            if attempt == 2:
                raise
            time.sleep(0.2)
    ring = hsm.key_ring(name)
    if command in ("rotate-loop", "sweep-loop"):
        say(ready=True)
    if command == "rotate-loop":
        while True:
            version = ring.rotate(EC("P-256"), usage="sign", grace=timedelta(hours=1))
            say(rotated=version.version)
    if command == "sweep-loop":
        while True:
            version = ring.rotate(EC("P-256"), usage="sign")
            say(rotated=version.version, swept=[v.version for v in ring.sweep()])
    if command == "rotate-at":
        start = float(argv[3])
        while time.time() < start:
            time.sleep(0.001)
        try:
            version = ring.rotate(EC("P-256"), usage="sign")
        except hsmbridge.KeyExists as exc:
            say(lost=str(exc))
        else:
            say(won=version.version)
        return 0
    if command == "watch":
        end = time.monotonic() + float(argv[3])
        seen = None
        say(ready=True)
        while time.monotonic() < end:
            try:
                primary = ring.primary
                signature = primary.sign(b"watch", "ecdsa-sha256")
                if primary.version != seen:
                    seen = primary.version
                    say(primary=seen, signature=signature.hex(), kid=primary.kid)
            except hsmbridge.HSMError as exc:
                say(error=type(exc).__name__, message=str(exc))
            time.sleep(0.05)
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
