"""Worker processes for tests/test_tokens.py (kept light: spawned children import it).

Run as a script: a parent opens the HSM, makes a key and forks four workers;
each signs 500 items and verifies them (gunicorn/uwsgi --preload).
"""

import os
import sys
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import hsmbridge


def open_list_close(args: tuple[Any, str]) -> str:
    """Wait at the barrier, then open, list and close: many processes at one moment."""
    barrier, uri = args
    barrier.wait()
    try:
        with hsmbridge.open(uri) as hsm:
            hsm.list_keys()
        return "ok"
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


def main() -> None:
    uri = sys.argv[1]
    hsm = hsmbridge.open(uri)
    key = hsm.generate_key(hsmbridge.EC("P-256"), f"fork-{os.getpid()}", usage="sign")
    key.sign(b"parent", "ecdsa-sha256")  # the parent uses its sessions and the session copy
    public = key.public_key()
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                messages = [f"w{worker}-{i}".encode() for i in range(500)]
                signatures = [key.sign(m, "ecdsa-sha256") for m in messages[:250]]
                signatures += key.sign_batch(messages[250:], "ecdsa-sha256", threads=2)
                for m, s in zip(messages, signatures, strict=True):
                    public.verify(s, m, ec.ECDSA(hashes.SHA256()))
                code = 0
            except BaseException as exc:  # report, then exit without running the parent's atexit
                print(f"worker {worker}: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                os._exit(code)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    key.sign(b"parent after", "ecdsa-sha256")  # the parent is unharmed
    key.delete()
    hsm.close()
    print(f"{4 - failed} of 4 workers signed and verified 500 items")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
