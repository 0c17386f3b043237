"""Re-measure the facts of docs/design.md that this machine can check cheaply.

    .venv/bin/python benchmarks/facts.py            # all of them, a few minutes
    .venv/bin/python benchmarks/facts.py 1 5 14     # only these facts

Each fact runs in a child process on a throwaway SoftHSM2 token (a module is
loaded and initialised once per process, and fact 1 is a crash), and prints
one JSON line: the fact's number, what was observed, and the versions used.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PIN = "1234"
SPY_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"
P11_KIT_PROXY = "/usr/lib/x86_64-linux-gnu/libp11-kit.so.0"


# --- children: each runs in its own process, argv = [module, token label] ---


def _login(module: str, label: str, *, os_locking: bool) -> tuple[Any, Any]:
    import pkcs11

    if os_locking:
        from hsmbridge.pkcs11.module import load_module

        lib = load_module(module).lib
    else:
        lib = pkcs11.lib(module)  # python-pkcs11 alone: C_Initialize(NULL)
    token = lib.get_token(token_label=label)
    return token, token.open(rw=True, user_pin=PIN)


def _ec_key(session: Any, label: str) -> Any:
    from pkcs11 import KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    params = session.create_domain_parameters(
        KeyType.EC,
        {pkcs11_attr("EC_PARAMS"): encode_named_curve_parameters("secp256r1")},
        local=True,
    )
    _, private = params.generate_keypair(store=True, label=label)
    return private


def pkcs11_attr(name: str) -> Any:
    from pkcs11 import Attribute

    return getattr(Attribute, name)


def child_threads(module: str, label: str, os_locking: str) -> dict[str, Any]:
    """Fact 1: two threads, two sessions, ECDSA signing; returns only if nothing crashed."""
    from pkcs11 import Mechanism, ObjectClass

    token, login = _login(module, label, os_locking=os_locking == "yes")
    key_label = f"fact1-{os.getpid()}"
    _ec_key(login, key_label)

    def work_on_own_session() -> None:
        session = token.open()
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
        for i in range(2000):
            key.sign(hashlib.sha256(str(i).encode()).digest(), mechanism=Mechanism.ECDSA)

    threads = [threading.Thread(target=work_on_own_session) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"signatures": 4000}


def child_login(module: str, label: str) -> dict[str, Any]:
    """Fact 2: login belongs to the application; closing a logged-in session logs all out."""
    from pkcs11 import ObjectClass

    token, login = _login(module, label, os_locking=True)
    _ec_key(login, f"fact2-{os.getpid()}")
    try:
        token.open(user_pin=PIN)
        second_login = "accepted"
    except Exception as exc:
        second_login = type(exc).__name__
    worker = token.open()  # no PIN: inherits the login
    before = len(list(worker.get_objects({pkcs11_attr("CLASS"): ObjectClass.PRIVATE_KEY})))
    login.close()  # python-pkcs11 calls C_Logout first
    after = len(list(worker.get_objects({pkcs11_attr("CLASS"): ObjectClass.PRIVATE_KEY})))
    return {
        "second_open_with_pin": second_login,
        "private_keys_seen_by_pinless_session_before_close": before,
        "after_closing_the_login_session": after,
    }


def child_calls(module: str, label: str, who: str) -> dict[str, Any]:
    """Fact 3: C_Sign calls per C_SignInit, counted by OpenSC's pkcs11-spy."""
    if who == "python-pkcs11":
        from pkcs11 import Mechanism

        _, login = _login(module, label, os_locking=True)
        key = _ec_key(login, f"fact3-{os.getpid()}")
        for i in range(10):
            key.sign(hashlib.sha256(str(i).encode()).digest(), mechanism=Mechanism.ECDSA)
    else:
        import hsmbridge

        hsm = hsmbridge.open(f"pkcs11:token={label}?module-path={module}", pin=PIN)
        key = hsm.generate_key(hsmbridge.EC("P-256"), label=f"fact3-{os.getpid()}")
        for i in range(10):
            key.sign(str(i).encode(), "ecdsa-sha256")
        key.delete()
        hsm.close()
    return {}


def child_mechanisms(module: str, label: str) -> dict[str, Any]:
    """Facts 6 and 7: OAEP hashes on SoftHSM2, python-pkcs11's ECDSA output form."""
    from pkcs11 import MGF, KeyType, Mechanism

    _, login = _login(module, label, os_locking=True)
    public, private = login.generate_keypair(KeyType.RSA, 2048, store=False)
    oaep = {}
    for name, hash_mech, mgf in (
        ("sha1", Mechanism.SHA_1, MGF.SHA1),
        ("sha256", Mechanism.SHA256, MGF.SHA256),
    ):
        try:
            ct = public.encrypt(b"x", mechanism=Mechanism.RSA_PKCS_OAEP,
                                mechanism_param=(hash_mech, mgf, None))  # fmt: skip
            private.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=(hash_mech, mgf, None))  # fmt: skip
            oaep[name] = "ok"
        except Exception as exc:
            oaep[name] = type(exc).__name__
    ec = _ec_key(login, f"fact7-{os.getpid()}")
    signature = ec.sign(b"\x00" * 32, mechanism=Mechanism.ECDSA)
    return {
        "oaep": oaep,
        "ecdsa_p256_signature_bytes": len(signature),
        "ecdsa_starts_with_der_sequence": signature[:1] == b"\x30" and len(signature) != 64,
    }


def child_keygen(module: str, label: str) -> dict[str, Any]:
    """Fact 14: RSA-2048 generation time on SoftHSM2 (ms, 8 keys)."""
    import hsmbridge

    hsm = hsmbridge.open(f"pkcs11:token={label}?module-path={module}", pin=PIN)
    times = []
    for i in range(8):
        start = time.perf_counter()
        key = hsm.generate_key(hsmbridge.RSA(2048), label=f"fact14-{os.getpid()}-{i}")
        times.append((time.perf_counter() - start) * 1000)
        key.delete()
    hsm.close()
    return {
        "rsa2048_keygen_ms_min_median_max": [
            round(min(times)),
            round(statistics.median(times)),
            round(max(times)),
        ]
    }


def child_ceiling(module: str, label: str) -> dict[str, Any]:
    """Fact 5: the C loop (``hsmbridge._native.ceiling``) on a token key and on a session
    copy of it, alternated over 3 rounds (fact 18), CPU time per operation.

    The keys are made with python-pkcs11's defaults, which leave them copyable:
    hsmbridge's own keys are not (key separation), so they admit no session copy.
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import Mechanism as CKM
    from pkcs11.util.ec import encode_named_curve_parameters

    from hsmbridge.mechanisms import Mechanism, signing_input
    from hsmbridge.pkcs11.module import load_module, load_native

    native = load_native()
    token = load_module(module).lib.get_token(token_label=label)  # OS locking, as hsmbridge
    out: dict[str, Any] = {"threads": 1}
    with token.open(rw=True, user_pin=PIN) as admin, token.open() as worker:
        params = admin.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        _, ec_key = params.generate_keypair(store=True, label="ec")
        _, rsa_key = admin.generate_keypair(KeyType.RSA, 2048, store=True, label="rsa")
        cases = (
            (ec_key, CKM.ECDSA, Mechanism.ECDSA_SHA256, 64, 20000),
            (rsa_key, CKM.RSA_PKCS, Mechanism.RSA_PKCS1_SHA256, 256, 2000),
        )
        for key, ckm, mech, out_len, count in cases:
            assert key.object_class == ObjectClass.PRIVATE_KEY
            copy = key.copy({Attribute.TOKEN: False, Attribute.LABEL: "", Attribute.ID: b""})
            handles = {"token_key": int(key.handle), "session_copy": int(copy.handle)}
            item = signing_input(mech, b"fact 5", prehashed=False)
            row: dict[str, list[float]] = {name: [] for name in handles}
            for _ in range(3):
                for name, handle in handles.items():
                    _, cpu, rv = native.ceiling(
                        module, 0, [int(worker.handle)], handle, int(ckm), None, item,
                        out_len, count,
                    )  # fmt: skip
                    if rv:
                        raise pkcs11.PKCS11Error(f"CK_RV 0x{rv:x}")
                    row[name].append(cpu / count * 1e6)
            copy.destroy()
            medians = {k: round(statistics.median(v), 1) for k, v in row.items()}
            out[mech.value] = {
                "cpu_us_per_op_median_of_3": medians,
                "token_key_over_session_copy": round(
                    medians["token_key"] / medians["session_copy"], 2
                ),
            }
    return out


def child_eddsa(module: str, label: str) -> dict[str, Any]:
    """Fact 19: what SoftHSM2 offers for Ed25519 (CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA)."""
    from asn1crypto import core as asn1_core
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    token, login = _login(module, label, os_locking=True)
    listed = {int(m) for m in token.slot.get_mechanisms()}
    out: dict[str, Any] = {
        "lists_CKM_EC_EDWARDS_KEY_PAIR_GEN_0x1055": 0x1055 in listed,
        "lists_CKM_EDDSA_0x1057": 0x1057 in listed,
    }
    params = {
        "oid_1.3.101.112": asn1_core.ObjectIdentifier("1.3.101.112").dump(),
        "printable_edwards25519": asn1_core.PrintableString("edwards25519").dump(),
        "oid_1.3.101.113_ed448": asn1_core.ObjectIdentifier("1.3.101.113").dump(),
    }
    message = b"fact 19: the message itself is signed, no prehash"
    for name, ec_params in params.items():
        try:
            pub, priv = login.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                store=False,
                public_template={Attribute.EC_PARAMS: ec_params},
            )
        except Exception as exc:
            out[f"generate_{name}"] = type(exc).__name__
            continue
        point = pub[Attribute.EC_POINT]
        result: dict[str, Any] = {
            "ec_point_bytes": len(point),
            "ec_point_is_der_octet_string": point[:2] == bytes((0x04, len(point) - 2)),
            "stored_ec_params_hex": bytes(pub[Attribute.EC_PARAMS]).hex(),
            "private_key_ec_params_hex": bytes(priv[Attribute.EC_PARAMS]).hex(),
        }
        try:
            signature = priv.sign(message, mechanism=Mechanism.EDDSA)
            result["signature_bytes"] = len(signature)
            raw = asn1_core.OctetString.load(point).native if len(point) != 32 else point
            if len(raw) == 32:
                ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
                result["verified_by_cryptography_as_pure_ed25519"] = True
        except Exception as exc:
            result["sign"] = type(exc).__name__
        out[f"generate_{name}"] = result
    # import: CKA_VALUE is the 32-byte seed (RFC 8032 private key)
    secret = ed25519.Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization as ser

    seed = secret.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    try:
        imported = login.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.TOKEN: False, Attribute.SIGN: True, Attribute.SENSITIVE: True,
            Attribute.EC_PARAMS: params["printable_edwards25519"], Attribute.VALUE: seed,
        })  # fmt: skip
        signature = imported.sign(message, mechanism=Mechanism.EDDSA)
        secret.public_key().verify(signature, message)
        out["import_seed_as_CKA_VALUE"] = "signs, verified by cryptography"
    except Exception as exc:
        out["import_seed_as_CKA_VALUE"] = type(exc).__name__
    return out


def _data_template(label: str) -> dict[Any, Any]:
    from pkcs11 import Attribute, ObjectClass

    return {Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.LABEL: label}


def child_create_data(module: str, label: str, *labels: str) -> dict[str, Any]:
    """Create a token data object per label, then exit."""
    _, session = _login(module, label, os_locking=True)
    for name in labels:
        session.create_object({**_data_template(name), pkcs11_attr("VALUE"): b"x"})
    return {"created": len(labels)}


def child_visibility(module: str, label: str) -> dict[str, Any]:
    """Fact 20: search; another process creates X; create Y; can this process find X?"""
    _, session = _login(module, label, os_locking=True)
    seen = []
    for trial in range(3):
        theirs, mine = f"fact20-theirs-{trial}-{os.getpid()}", f"fact20-mine-{trial}"
        list(session.get_objects(_data_template("nothing")))  # a search: the view is fresh
        subprocess.run(
            [sys.executable, __file__, "--child", "create_data", module, label, theirs],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        session.create_object({**_data_template(mine), pkcs11_attr("VALUE"): b"y"})
        found = []
        for _ in range(3):
            found.append(bool(list(session.get_objects(_data_template(theirs)))))
            time.sleep(0.1)
        seen.append(found)
    return {"other_process_object_found_after_own_write": seen}


def child_destroy(module: str, label: str, prefix: str, count: str, start: str) -> dict[str, Any]:
    """Fact 21: destroy every object labelled PREFIX-i at time START; report each outcome."""
    for attempt in range(5):  # SoftHSM2 may fail C_GetTokenInfo while another process writes
        try:
            _, session = _login(module, label, os_locking=True)
            break
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.2)
    objects = [
        next(iter(session.get_objects(_data_template(f"{prefix}-{i}")))) for i in range(int(count))
    ]
    while time.time() < float(start):
        time.sleep(0.0005)
    outcomes = []
    for obj in objects:
        try:
            obj.destroy()
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return {"outcomes": outcomes}


def child_object_costs(module: str, label: str, *counts: str) -> dict[str, Any]:
    """Fact 23: with N token objects present, the median cost of one token data object's
    C_CreateObject, of reading an attribute of it, and of its C_DestroyObject (by handle:
    no search), and of a session object's create and destroy."""
    _, session = _login(module, label, os_locking=True)
    value = pkcs11_attr("VALUE")
    made, out = 0, {}
    for target in map(int, counts):
        while made < target:
            session.create_object({**_data_template(f"fill-{made}"), value: b"x" * 64})
            made += 1
        costs: dict[str, list[float]] = {}
        for i in range(15):
            t0 = time.perf_counter()
            obj = session.create_object({**_data_template(f"probe-{i}"), value: b"y" * 64})
            t1 = time.perf_counter()
            obj[pkcs11_attr("LABEL")]
            t2 = time.perf_counter()
            obj.destroy()
            t3 = time.perf_counter()
            temp = session.create_object(
                {**_data_template(f"temp-{i}"), pkcs11_attr("TOKEN"): False, value: b"z"}
            )
            t4 = time.perf_counter()
            temp.destroy()
            t5 = time.perf_counter()
            for name, cost in (
                ("token_object_create", t1 - t0),
                ("read_attribute", t2 - t1),
                ("token_object_destroy_by_handle", t3 - t2),
                ("session_object_destroy", t5 - t4),
            ):
                costs.setdefault(name, []).append(cost * 1000)
        out[f"{made}_objects_ms"] = {k: round(statistics.median(v), 3) for k, v in costs.items()}
    return out


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "create_data": child_create_data,
    "visibility": child_visibility,
    "destroy": child_destroy,
    "threads": child_threads,
    "login": child_login,
    "calls": child_calls,
    "mechanisms": child_mechanisms,
    "keygen": child_keygen,
    "ceiling": child_ceiling,
    "eddsa": child_eddsa,
    "object_costs": child_object_costs,
}


# --- parent ---


class Token:
    def __init__(self) -> None:
        from hsmbridge.softhsm import make_tokens

        self.dir = Path(tempfile.mkdtemp(prefix="hsmbridge-facts-"))
        self.token = make_tokens(self.dir, ["facts"], pin=PIN)[0]

    def run(self, child: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
        module = (env or {}).get("FACTS_MODULE", self.token.module)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", child, module, self.token.label, *args],
            env={**os.environ, **self.token.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0 and child != "threads":  # fact 1's child may crash on purpose
            raise RuntimeError(f"child {child} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        lines = proc.stdout.strip().splitlines()
        return proc.returncode, json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def fact_1(token: Token) -> dict[str, Any]:
    runs = 10
    out: dict[str, Any] = {"runs": runs}
    for mode in ("no", "yes"):
        codes = [token.run("threads", mode)[0] for _ in range(runs)]
        name = "python_pkcs11_NULL_init" if mode == "no" else "after_hsmbridge_os_locking"
        out[name] = {"crashed": sum(c != 0 for c in codes), "exit_codes": sorted(set(codes))}
    return out


def fact_2(token: Token) -> dict[str, Any]:
    return dict(token.run("login")[1])


def fact_3(token: Token) -> dict[str, Any]:
    if not os.path.isfile(SPY_MODULE):
        return {"skipped": f"{SPY_MODULE} not installed (apt-get install opensc-pkcs11)"}
    out = {}
    for who in ("python-pkcs11", "hsmbridge"):
        log = token.dir / f"spy-{who}.log"
        env = {"PKCS11SPY": token.token.module, "PKCS11SPY_OUTPUT": str(log)}
        code, _ = token.run("calls", who, env={**env, "FACTS_MODULE": SPY_MODULE})
        text = log.read_text() if log.exists() else ""
        calls = [line.split(": ", 1)[1].strip() for line in text.splitlines() if ": C_" in line]
        inits, signs = calls.count("C_SignInit"), calls.count("C_Sign")
        out[who] = {"exit": code, "C_SignInit": inits, "C_Sign": signs}
    return out


def fact_5(token: Token) -> dict[str, Any]:
    return dict(token.run("ceiling")[1])


def fact_6_7(token: Token) -> dict[str, Any]:
    return dict(token.run("mechanisms")[1])


def fact_12(token: Token) -> dict[str, Any]:
    out = {}
    for name, path in (("p11-kit proxy", P11_KIT_PROXY), ("SoftHSM2", token.token.module)):
        if not os.path.isfile(path):
            out[name] = "not installed"
            continue
        get_list = ctypes.CDLL(path).C_GetFunctionList
        get_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        first, second = ctypes.c_void_p(), ctypes.c_void_p()
        get_list(ctypes.byref(first))
        get_list(ctypes.byref(second))
        out[name] = "same function list" if first.value == second.value else "two function lists"
    return out


def fact_14(token: Token) -> dict[str, Any]:
    return dict(token.run("keygen")[1])


def fact_19(token: Token) -> dict[str, Any]:
    return dict(token.run("eddsa")[1])


def fact_20(token: Token) -> dict[str, Any]:
    return dict(token.run("visibility")[1])


def fact_21(token: Token) -> dict[str, Any]:
    count, racers = 300, 3
    prefix = f"fact21-{os.getpid()}"
    token.run("create_data", *(f"{prefix}-{i}" for i in range(count)))
    start = str(time.time() + 3.0)
    env = {**os.environ, **token.token.env()}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "destroy",
                token.token.module,
                token.token.label,
                prefix,
                str(count),
                start,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(racers)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a destroying process failed ({proc.returncode}):\n{err[-2000:]}")
        outcomes.append(json.loads(out.strip().splitlines()[-1])["outcomes"])
    winners = [sum(o[i] == "ok" for o in outcomes) for i in range(count)]
    losses: dict[str, int] = {}
    for o in outcomes:
        for outcome in o:
            if outcome != "ok":
                losses[outcome] = losses.get(outcome, 0) + 1
    return {
        "objects": count,
        "processes": racers,
        "objects_by_number_of_successful_destroys": {
            str(n): winners.count(n) for n in sorted(set(winners))
        },
        "failed_destroys": losses,
    }


def fact_22(token: Token) -> dict[str, Any]:
    """The loop probes (benchmarks/loopprobe.py) on a loop that does nothing else, each
    alone, then the timer probe on the same loop woken by a thread with nothing to run
    at random moments (about one wake-up per ms, like completions arriving from a pool,
    or the socket probe's own). No HSM and no hsmbridge: the event loop alone."""
    import asyncio
    import random

    from loopprobe import SocketProbe, TimerProbe, summary

    def measure(probe: TimerProbe | SocketProbe, wakeups: bool) -> dict[str, Any]:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = threading.Event()

            def waker() -> None:
                while not stop.wait(random.uniform(0, 0.002)):
                    loop.call_soon_threadsafe(lambda: None)

            thread = threading.Thread(target=waker)
            if wakeups:
                thread.start()
            probe.start()
            await asyncio.sleep(3.0)
            await probe.stop()
            stop.set()
            if wakeups:
                thread.join()

        asyncio.run(main())
        if isinstance(probe, TimerProbe):
            return summary([lag for lag, _ in probe.samples])
        return summary(probe.samples)

    del token  # no token: this is the event loop alone
    return {
        "timer_probe_idle_loop_ms": measure(TimerProbe(), False),
        "timer_probe_woken_about_every_ms_ms": measure(TimerProbe(), True),
        "socket_probe_idle_loop_ms": measure(SocketProbe(), False),
    }


def fact_23(token: Token) -> dict[str, Any]:
    del token  # its own token: thousands of objects that are not worth destroying
    own = Token()
    try:
        return dict(own.run("object_costs", "0", "1000", "3000")[1])
    finally:
        shutil.rmtree(own.dir, ignore_errors=True)


FACTS: dict[str, Callable[[Token], dict[str, Any]]] = {
    "1": fact_1,
    "2": fact_2,
    "3": fact_3,
    "5": fact_5,
    "6": fact_6_7,
    "7": fact_6_7,
    "12": fact_12,
    "14": fact_14,
    "19": fact_19,
    "20": fact_20,
    "21": fact_21,
    "22": fact_22,
    "23": fact_23,
}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    softhsm = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True)
    return {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "softhsm2": softhsm.stdout.strip(),
        "python-pkcs11": version("python-pkcs11"),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](*argv[2:])))
        return 0
    wanted = argv or list(FACTS)
    unknown = [n for n in wanted if n not in FACTS]
    if unknown:
        print(f"no cheap re-measurement for fact {', '.join(unknown)}; "
              f"measurable here: {', '.join(FACTS)}", file=sys.stderr)  # fmt: skip
        return 2
    token = Token()
    try:
        print(json.dumps({"versions": versions()}))
        done: set[Callable[[Token], dict[str, Any]]] = set()
        for number in wanted:
            measure = FACTS[number]
            if measure not in done:
                done.add(measure)
                print(json.dumps({"fact": number, **measure(token)}), flush=True)
    finally:
        shutil.rmtree(token.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
