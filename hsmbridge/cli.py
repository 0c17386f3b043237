"""The ``hsmbridge`` command.

Exit codes: 0 success, 1 an HSM error (one line on stderr), 2 a usage error.
Data goes through stdin/stdout by default, as bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from . import HSM_ENV, HSMError
from . import open as open_hsm
from .api import HSM, parse_key_spec

FORMATS = ("pem", "der", "jwk", "upload-json")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"hsmbridge: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hsmbridge", description="Keys that live inside an HSM.")
    parser.add_argument(
        "--hsm",
        default=os.environ.get(HSM_ENV),
        help=f"HSM URI, pkcs11:... or nethsm://USER@HOST:PORT (default: ${HSM_ENV})",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("keygen", help="generate a key pair inside the HSM")
    p.add_argument(
        "--type", required=True, help="rsa:2048|rsa:3072|rsa:4096|ec:p256|ec:p384|ec:p521|ed25519"
    )
    p.add_argument("--label", required=True)
    p.add_argument("--usage", default="sign", help="comma-separated: sign,decrypt (default sign)")

    p = sub.add_parser("list", help="list keys")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    p = sub.add_parser("pubkey", help="export a public key")
    p.add_argument("label")
    p.add_argument("--format", choices=FORMATS, default="pem")
    p.add_argument("--min-bits", type=int, default=2048, help="for upload-json (default 2048)")
    p.add_argument("--out", help="file to write (default stdout)")

    for name, verb in (("sign", "sign"), ("decrypt", "decrypt")):
        p = sub.add_parser(name, help=f"{verb} data with a key (binary-safe)")
        p.add_argument("label")
        p.add_argument("--mechanism", "-m", required=True)
        p.add_argument("--in", dest="infile", help="input file (default stdin)")
        p.add_argument("--out", help="output file (default stdout)")
        if name == "sign":
            p.add_argument("--prehashed", action="store_true", help="input is the digest")
            p.add_argument("--signature-format", choices=("der", "raw"), default="der")

    p = sub.add_parser("delete", help="destroy a key in the HSM")
    p.add_argument("label")

    p = sub.add_parser("demo", help="generate keys, export PEM, batch sign/decrypt with throughput")
    p.add_argument("--count", type=int, default=2000, help="operations per batch (default 2000)")
    p.add_argument("--keep", action="store_true", help="keep the demo keys afterwards")

    p = sub.add_parser("bench", help="hot-path benchmark against the C ceiling and baselines")
    p.add_argument("--count", type=int, default=2000, help="operations per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--only", default="", help="comma-separated subset of suites")

    p = sub.add_parser("serve", help="serve the NetHSM REST API over this HSM")
    p.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT (default 127.0.0.1:8443)")
    p.add_argument("--state-dir", required=True, help="where the database and TLS files live")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    return parser


def _read_input(path: str | None) -> bytes:
    if path is None or path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise _UsageError(f"cannot read {path!r}: {exc.strerror}") from None


def _write_output(data: bytes, path: str | None) -> None:
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise _UsageError(f"cannot write {path!r}: {exc.strerror}") from None


class _UsageError(Exception):
    pass


def _open(args: argparse.Namespace) -> HSM:
    if not args.hsm and args.command == "demo":
        from .softhsm import embedded_demo_token

        token = embedded_demo_token()
        print(f"using the embedded SoftHSM2 token {token.label!r} in {token.conf.parent}")
        return open_hsm(token.uri, pin=token.pin)
    if not args.hsm:
        raise _UsageError(f"no HSM given: pass --hsm URI or set {HSM_ENV}")
    return open_hsm(args.hsm)


def _print_table(rows: list[dict[str, Any]], out: IO[str]) -> None:
    if not rows:
        print("no keys", file=out)
        return
    headers = ["label", "id", "type", "size", "curve", "usage"]
    cells = [
        [str(r[h] if not isinstance(r[h], list) else ",".join(r[h])) for h in headers] for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)), file=out)


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "serve":
        from .server.run import serve

        if not args.hsm:
            raise _UsageError(f"no HSM given: pass --hsm URI or set {HSM_ENV}")
        serve(args.hsm, args.listen, args.state_dir, args.tls_cert, args.tls_key)
        return 0
    if cmd == "bench":
        from .bench import run_bench

        status: int = run_bench(args)
        return status
    with _open(args) as hsm:
        if cmd == "keygen":
            usage = {u.strip() for u in args.usage.split(",") if u.strip()}
            key = hsm.generate_key(parse_key_spec(args.type), label=args.label, usage=usage)
            uses = ",".join(sorted(key.info.usage))
            print(f"generated {key.spec} key {key.label!r} id {key.id} usage {uses}")
        elif cmd == "list":
            rows = [info.to_dict() for info in hsm.list_keys()]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_table(rows, sys.stdout)
        elif cmd == "pubkey":
            key = hsm.get_key(args.label)
            data: bytes
            if args.format == "pem":
                data = key.public_key_pem().encode()
            elif args.format == "der":
                data = key.public_key_der()
            elif args.format == "jwk":
                data = (json.dumps(key.public_key_jwk()) + "\n").encode()
            else:
                data = (key.upload_json(min_bits=args.min_bits) + "\n").encode()
            _write_output(data, args.out)
        elif cmd == "sign":
            key = hsm.get_key(args.label)
            sig = key.sign(
                _read_input(args.infile),
                args.mechanism,
                prehashed=args.prehashed,
                signature_format=args.signature_format,
            )
            _write_output(sig, args.out)
        elif cmd == "decrypt":
            key = hsm.get_key(args.label)
            _write_output(key.decrypt(_read_input(args.infile), args.mechanism), args.out)
        elif cmd == "delete":
            key = hsm.get_key(args.label)
            key.delete()
            print(f"deleted key {key.label!r} id {key.id}")
        elif cmd == "demo":
            from .demo import run_demo

            run_demo(hsm, count=args.count, keep=args.keep)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except _UsageError as exc:
        print(f"hsmbridge: error: {exc}", file=sys.stderr)
        return 2
    except HSMError as exc:
        print(f"hsmbridge: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
