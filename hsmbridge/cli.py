"""The ``hsmbridge`` command.

Exit codes: 0 success, 1 an HSM error (one line on stderr), 2 a usage error.
Data goes through stdin/stdout by default, as bytes. The global options
(``--hsm``, ``--json``) are accepted before or after the subcommand: every
subcommand's parser has them too (:func:`_global_options`), with defaults
suppressed so a value given before the subcommand is kept.

Each subcommand is one ``_add_*`` function (its arguments) and one ``cmd_*``
function (what it does), joined by ``set_defaults(run=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import IO, Any, NoReturn

from . import HSM_ENV, HSMError, KeyExists, KeyNotFound
from . import open as open_hsm
from .api import HSM, Key, parse_key_spec
from .rings import RING_NAME_RE, KeyRing, KeyVersion

#: environment variable naming the PostgreSQL database replicas share (hsmbridge serve)
DATABASE_ENV = "HSMBRIDGE_DATABASE"
FORMATS = ("pem", "der", "jwk", "upload-json")
#: what ``--key-type`` may say for upload-json; payment providers ask for RSA
UPLOAD_KEY_TYPES = ("rsa", "ec", "any")
KEY_HELP = "the key's label, or an RFC 7512 URI naming it (pkcs11:object=LABEL;type=private)"

Command = Callable[[argparse.Namespace], int | None]
HSMCommand = Callable[[HSM, argparse.Namespace], int | None]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"hsmbridge: error: {message}\n")


class _UsageError(Exception):
    """Exit 2 with one line: the command line or its files are wrong."""


class _Failure(Exception):
    """Exit 1 with one line: the HSM answered, but there is nothing to show."""


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--hsm`` and ``--json``; on subcommands their defaults are suppressed."""
    parser.add_argument(
        "--hsm",
        default=os.environ.get(HSM_ENV) if top else argparse.SUPPRESS,
        help=f"HSM URI, pkcs11:... or nethsm://USER@HOST:PORT (default: ${HSM_ENV})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print JSON instead of a table or a line",
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hsmbridge", description="Keys that live inside an HSM.")
    _global_options(parser, top=True)
    common = _Parser(add_help=False)
    _global_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    for add_command in (
        _add_keygen, _add_list, _add_info, _add_pubkey, _add_sign_decrypt, _add_delete, _add_csr,
        _add_cert, _add_demo, _add_bench, _add_serve, _add_completion, _add_ring_commands,
    ):  # fmt: skip
        add_command(add, common)
    return parser


Adder = Callable[[str, str], argparse.ArgumentParser]


# -- output helpers ------------------------------------------------------------------


# -- key rings -------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``5m``, ``24h``, ``7d``, ``1h30m``, or ``0``."""
    text = text.strip().lower()
    parts = _DURATION_RE.findall(text)
    if text != "0" and "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 30s, 5m, 24h, 7d or 1h30m"
        )
    return sum((timedelta(**{_UNITS[u]: int(n)}) for n, u in parts), timedelta(0))


def _add_ring_commands(add: Adder, common: _Parser) -> None:
    p = add("ring", "key rings: versioned keys (see rotate, versions, jwks)")
    ring_sub = p.add_subparsers(dest="ring_command", required=True, parser_class=_Parser)
    p = ring_sub.add_parser("create", help="create a ring: its first version is primary")
    p.add_argument("name")
    p.add_argument("--type", required=True, help="rsa:2048|rsa:3072|rsa:4096|ec:p256|...")
    p.add_argument(
        "--usage",
        default="sign",
        help="comma-separated: sign,decrypt, or decrypt-raw alone (default sign)",
    )
    p.set_defaults(run=_with_hsm(_run_ring_command), command="ring")

    p = add("rotate", "add a ring version; older ones work for --grace more")
    p.add_argument("name")
    p.add_argument("--grace", type=parse_duration, default=timedelta(0), help="e.g. 24h")
    p.add_argument("--activate-in", type=parse_duration, default=timedelta(0), help="e.g. 5m")
    p.set_defaults(run=_with_hsm(_run_ring_command))

    p = add("versions", "a ring's versions and their states")
    p.add_argument("name")
    p.set_defaults(run=_with_hsm(_run_ring_command))

    p = add("jwks", "a ring's JWK Set (pending, primary and grace versions)")
    p.add_argument("name")
    p.set_defaults(run=_with_hsm(_run_ring_command))

    p = add("sweep", "destroy expired ring versions and keys (cron-friendly)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be destroyed")
    p.set_defaults(run=_with_hsm(_run_ring_command))


def _describe_version(v: KeyVersion) -> str:
    name = f"{v.ring}@{v.version}" if v.ring else f"key {v.label!r}"
    after = v.not_after.isoformat() if v.not_after else "-"
    return f"{name} kid {v.kid} id {v.key_id} {v.state} not_after {after}"


def _run_ring_command(hsm: HSM, args: argparse.Namespace) -> None:
    cmd = args.command
    if cmd == "ring":  # the only ring subcommand: create
        ring = hsm.key_ring(args.name)
        if ring.versions():
            raise KeyExists(f"key ring {args.name!r} exists already; rotate it instead")
        usage = {u.strip() for u in args.usage.split(",") if u.strip()}
        version = ring.rotate(parse_key_spec(args.type), usage=usage)
        print(f"created ring {args.name!r}: {_describe_version(version)}")
    elif cmd == "rotate":
        version = hsm.key_ring(args.name).rotate(grace=args.grace, activate_in=args.activate_in)
        print(f"rotated: {_describe_version(version)}")
    elif cmd == "versions":
        versions = hsm.key_ring(args.name).versions()
        if args.json:
            print(json.dumps([v.to_dict() for v in versions], indent=2))
        else:
            for v in versions:
                print(_describe_version(v))
    elif cmd == "jwks":
        print(json.dumps(hsm.key_ring(args.name).jwks(), indent=2))
    else:
        verb = "would destroy" if args.dry_run else "destroyed"
        for v in hsm.sweep(dry_run=args.dry_run):
            line = json.dumps(v.to_dict()) if args.json else f"{verb} {_describe_version(v)}"
            print(line, flush=True)


_VERSION_RE = re.compile(r"(.+)@([1-9][0-9]*)")


def _key_or_ring(hsm: HSM, name: str) -> Key | KeyRing:
    """A key by label or URI, ``NAME@VERSION`` of a ring, or a ring by name (its primary)."""
    match = _VERSION_RE.fullmatch(name)
    if match and RING_NAME_RE.fullmatch(match[1]) and hsm.key_ring(match[1]).versions():
        return hsm.key_ring(match[1]).version(int(match[2]))
    try:
        return _key(hsm, name)
    except KeyNotFound:
        if RING_NAME_RE.fullmatch(name) and hsm.key_ring(name).versions():
            return hsm.key_ring(name)
        raise


def _key_of(hsm: HSM, name: str) -> Key:
    found = _key_or_ring(hsm, name)
    return found.primary if isinstance(found, KeyRing) else found


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


def _say(args: argparse.Namespace, line: str, data: Any) -> None:
    """One human line, or ``data`` as JSON with ``--json``."""
    print(json.dumps(data, indent=2) if args.json else line)


def _print_table(rows: list[dict[str, Any]], headers: list[str], out: IO[str]) -> None:
    cells = [
        [str(r[h] if not isinstance(r[h], list) else ",".join(r[h])) for h in headers] for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip(), file=out)


# -- key commands ----------------------------------------------------------------------


def _key(hsm: HSM, label: str) -> Key:
    """A key by label, or by an RFC 7512 URI where a label is expected."""
    if label.startswith("pkcs11:"):
        return hsm.get_key(uri=label)
    return hsm.get_key(label)


def _add_info(add: Adder, common: _Parser) -> None:
    add("info", "what hsmbridge learned about the token or HSM").set_defaults(
        run=_with_hsm(cmd_info)
    )


def cmd_info(hsm: HSM, args: argparse.Namespace) -> None:
    info = hsm.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    width = max(len(name) for name in info)
    for name, value in info.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        print(f"{name.ljust(width)}  {text}")


def _add_keygen(add: Adder, common: _Parser) -> None:
    p = add("keygen", "generate a key pair inside the HSM")
    p.add_argument(
        "--type", required=True, help="rsa:2048|rsa:3072|rsa:4096|ec:p256|ec:p384|ec:p521|ed25519"
    )
    p.add_argument("--label", required=True)
    p.add_argument(
        "--usage",
        default="sign",
        help="comma-separated: sign,decrypt, or decrypt-raw alone (default sign)",
    )
    p.set_defaults(run=_with_hsm(cmd_keygen))


def cmd_keygen(hsm: HSM, args: argparse.Namespace) -> None:
    usage = {u.strip() for u in args.usage.split(",") if u.strip()}
    key = hsm.generate_key(parse_key_spec(args.type), label=args.label, usage=usage)
    uses = ",".join(sorted(key.info.usage))
    _say(
        args, f"generated {key.spec} key {key.label!r} id {key.id} usage {uses}", key.info.to_dict()
    )


def _add_list(add: Adder, common: _Parser) -> None:
    add("list", "list keys").set_defaults(run=_with_hsm(cmd_list))


def cmd_list(hsm: HSM, args: argparse.Namespace) -> None:
    rows = [info.to_dict() for info in hsm.list_keys()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no keys")
    else:
        _print_table(rows, ["label", "id", "type", "size", "curve", "usage"], sys.stdout)


def _add_pubkey(add: Adder, common: _Parser) -> None:
    p = add("pubkey", "export a public key")
    p.add_argument("label", help=KEY_HELP)
    p.add_argument("--format", choices=FORMATS, default="pem")
    p.add_argument(
        "--min-bits", type=positive_int, default=2048, help="for upload-json (default 2048)"
    )
    p.add_argument(
        "--key-type",
        choices=UPLOAD_KEY_TYPES,
        default="rsa",
        help="for upload-json: the algorithm the provider wants (default rsa)",
    )
    p.add_argument("--out", help="file to write (default stdout)")
    p.set_defaults(run=_with_hsm(cmd_pubkey))


def cmd_pubkey(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key_of(hsm, args.label)
    data: bytes
    if args.format == "pem":
        data = key.public_key_pem().encode()
    elif args.format == "der":
        data = key.public_key_der()
    elif args.format == "jwk":
        data = (json.dumps(key.public_key_jwk()) + "\n").encode()
    else:
        key_type = None if args.key_type == "any" else args.key_type
        data = (key.upload_json(min_bits=args.min_bits, key_type=key_type) + "\n").encode()
    _write_output(data, args.out)


def _add_sign_decrypt(add: Adder, common: _Parser) -> None:
    for name, run in (("sign", cmd_sign), ("decrypt", cmd_decrypt)):
        p = add(name, f"{name} data with a key (binary-safe)")
        p.add_argument("label", help=KEY_HELP)
        p.add_argument("--mechanism", "-m", required=True)
        p.add_argument("--in", dest="infile", help="input file (default stdin)")
        p.add_argument("--out", help="output file (default stdout)")
        if name == "sign":
            p.add_argument("--prehashed", action="store_true", help="input is the digest")
            p.add_argument("--signature-format", choices=("der", "raw"), default="der")
        p.set_defaults(run=_with_hsm(run))


def cmd_sign(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key_of(hsm, args.label)
    sig = key.sign(
        _read_input(args.infile),
        args.mechanism,
        prehashed=args.prehashed,
        signature_format=args.signature_format,
    )
    _write_output(sig, args.out)


def cmd_decrypt(hsm: HSM, args: argparse.Namespace) -> None:
    source = _key_or_ring(hsm, args.label)  # a ring tries primary, then grace (OAEP)
    _write_output(source.decrypt(_read_input(args.infile), args.mechanism), args.out)


def _add_delete(add: Adder, common: _Parser) -> None:
    p = add("delete", "destroy a key in the HSM")
    p.add_argument("label", help=KEY_HELP)
    p.set_defaults(run=_with_hsm(cmd_delete))


def cmd_delete(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key(hsm, args.label)
    key.delete()
    _say(args, f"deleted key {key.label!r} id {key.id}", {"deleted": key.info.to_dict()})


# -- CSRs and certificates ---------------------------------------------------------------


def _subject_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("label", help=KEY_HELP)
    p.add_argument("--subject", required=True, help='RFC 4514, e.g. "CN=api.example.com,O=Example"')
    p.add_argument(
        "--san",
        action="append",
        default=[],
        help="subjectAltName DNS:name, IP:addr, email:addr or URI:uri (repeatable)",
    )
    p.add_argument("--out", help="file to write the PEM to (default stdout)")


def _add_csr(add: Adder, common: _Parser) -> None:
    p = add("csr", "make a PKCS#10 certificate signing request signed by the key")
    _subject_options(p)
    p.set_defaults(run=_with_hsm(cmd_csr))


def cmd_csr(hsm: HSM, args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    csr = _key(hsm, args.label).csr(args.subject, sans=args.san)
    pem = csr.public_bytes(Encoding.PEM)
    if args.json:
        pem = (json.dumps({"label": args.label, "csr": pem.decode()}, indent=2) + "\n").encode()
    _write_output(pem, args.out)


def _add_cert(add: Adder, common: _Parser) -> None:
    p = add("cert", "the certificate stored with a key")
    cert_sub = p.add_subparsers(dest="cert_command", required=True, parser_class=_Parser)
    s = cert_sub.add_parser(
        "self-sign", help="make a self-signed certificate and store it", parents=[common]
    )
    _subject_options(s)
    s.add_argument("--days", type=positive_int, default=365, help="validity (default 365)")
    s.add_argument("--ca", action="store_true", help="mark it a CA (basicConstraints CA:TRUE)")
    s.set_defaults(run=_with_hsm(cmd_cert_self_sign))
    s = cert_sub.add_parser("import", help="store a certificate (PEM or DER)", parents=[common])
    s.add_argument("label", help=KEY_HELP)
    s.add_argument("--in", dest="infile", help="certificate file (default stdin)")
    s.set_defaults(run=_with_hsm(cmd_cert_import))
    s = cert_sub.add_parser("show", help="show the stored certificate", parents=[common])
    s.add_argument("label", help=KEY_HELP)
    s.add_argument("--pem", action="store_true", help="print the PEM instead of a table")
    s.set_defaults(run=_with_hsm(cmd_cert_show))
    s = cert_sub.add_parser("delete", help="remove the stored certificate", parents=[common])
    s.add_argument("label", help=KEY_HELP)
    s.set_defaults(run=_with_hsm(cmd_cert_delete))


def _cert_summary(key: Key, cert: Any) -> dict[str, Any]:
    from cryptography.hazmat.primitives.serialization import Encoding

    from .certificates import describe

    return {"label": key.label, "id": key.id, **describe(cert),
            "pem": cert.public_bytes(Encoding.PEM).decode()}  # fmt: skip


def cmd_cert_self_sign(hsm: HSM, args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    key = _key(hsm, args.label)
    cert = key.self_signed(args.subject, days=args.days, sans=args.san, ca=args.ca)
    key.set_certificate(cert)
    if args.json:
        data = (json.dumps(_cert_summary(key, cert), indent=2) + "\n").encode()
    else:
        data = cert.public_bytes(Encoding.PEM)
    _write_output(data, args.out)


def cmd_cert_import(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key(hsm, args.label)
    cert = key.set_certificate(_read_input(args.infile))
    summary = _cert_summary(key, cert)
    _say(args, f"stored the certificate of {summary['subject']!r} with key {key.label!r}", summary)


def cmd_cert_show(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key(hsm, args.label)
    cert = key.certificate()
    if cert is None:
        raise _Failure(
            f"key {key.label!r} has no certificate; store one with "
            "'hsmbridge cert import' or 'hsmbridge cert self-sign'"
        )
    summary = _cert_summary(key, cert)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif args.pem:
        sys.stdout.write(summary["pem"])
    else:
        rows = [{"field": k, "value": v} for k, v in summary.items() if k != "pem"]
        _print_table(rows, ["field", "value"], sys.stdout)


def cmd_cert_delete(hsm: HSM, args: argparse.Namespace) -> None:
    key = _key(hsm, args.label)
    if not key.delete_certificate():
        raise _Failure(f"key {key.label!r} has no certificate to delete")
    _say(args, f"deleted the certificate of key {key.label!r}", {"deleted": key.label})


# -- demo, bench, serve, completion ------------------------------------------------------


def _add_demo(add: Adder, common: _Parser) -> None:
    p = add("demo", "generate keys, export PEM, batch sign/decrypt with throughput")
    p.add_argument(
        "--count", type=positive_int, default=2000, help="operations per batch (default 2000)"
    )
    p.add_argument("--keep", action="store_true", help="keep the demo keys afterwards")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.hsm:
        hsm = open_hsm(args.hsm)
    else:
        from .softhsm import embedded_demo_token

        token = embedded_demo_token()
        print(f"using the embedded SoftHSM2 token {token.label!r} in {token.conf.parent}")
        hsm = open_hsm(token.uri, pin=token.pin)
    with hsm:
        run_demo(hsm, count=args.count, keep=args.keep)


def _add_bench(add: Adder, common: _Parser) -> None:
    from .bench.command import add_arguments

    p = add("bench", "measure an HSM against its C ceiling, plain loops and OpenSSL")
    add_arguments(p, common)
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run

    return run(args)


def _add_serve(add: Adder, common: _Parser) -> None:
    p = add("serve", "serve the NetHSM REST API over this HSM")
    p.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT (default 127.0.0.1:8443)")
    p.add_argument("--state-dir", required=True, help="where the database and TLS files live")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument(
        "--database",
        default=os.environ.get(DATABASE_ENV),
        help="postgresql://USER@HOST/DB shared by several replicas; its password only in "
        f"PGPASSWORD/PGPASSFILE/.pgpass (default: ${DATABASE_ENV}, else SQLite in --state-dir)",
    )
    p.add_argument(
        "--allow-pin-in-argv",
        action="store_true",
        help="accept a pin-value= in --hsm although every local user can read it in ps",
    )
    p.set_defaults(run=cmd_serve)


#: a PIN written into a URI (RFC 7512 pin-value), wherever the attribute stands
_PIN_VALUE = re.compile(r"(?i)[?&;:]pin-value=")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve; a PIN on the command line is refused: every local user can read the
    arguments in ps for as long as the server runs (the environment is the
    server user's own)."""
    from .server.run import serve

    if not args.allow_pin_in_argv and any(_PIN_VALUE.search(a) for a in args.argv):
        raise _UsageError(
            "refusing a PIN in --hsm (pin-value=): every local user can read it in ps for as "
            "long as the server runs. Give the PIN with HSMBRIDGE_PIN or pin-source=file:PATH "
            "(a 0600 file), or put the URI in HSMBRIDGE_HSM; --allow-pin-in-argv accepts "
            "the exposure."
        )
    serve(
        _require_hsm(args),
        args.listen,
        args.state_dir,
        args.tls_cert,
        args.tls_key,
        database=args.database,
    )


def _add_completion(add: Adder, common: _Parser) -> None:
    p = add("completion", "print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(run=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> None:
    from .completion import script

    sys.stdout.write(script(build_parser(), args.shell))


# -- running -------------------------------------------------------------------------------


def _require_hsm(args: argparse.Namespace) -> str:
    if not args.hsm:
        raise _UsageError(f"no HSM given: pass --hsm URI or set {HSM_ENV}")
    return str(args.hsm)


def _with_hsm(command: HSMCommand) -> Command:
    """A command run on the HSM of ``--hsm``, closed afterwards."""

    def run(args: argparse.Namespace) -> int | None:
        with open_hsm(_require_hsm(args)) as hsm:
            return command(hsm, args)

    run.__name__ = command.__name__
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what ps shows
    try:
        return args.run(args) or 0  # type: ignore[no-any-return]
    except _UsageError as exc:
        print(f"hsmbridge: error: {exc}", file=sys.stderr)
        return 2
    except _Failure as exc:
        print(f"hsmbridge: {exc}", file=sys.stderr)
        return 1
    except HSMError as exc:
        print(f"hsmbridge: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
