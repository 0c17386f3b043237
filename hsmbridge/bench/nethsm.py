"""NetHSM baselines: the official ``nethsm`` SDK in a plain loop, and what the appliance says."""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..mechanisms import signing_input
from ..nethsm import vocabulary
from ..uri import NetHSMURI
from .contenders import Contender, Target
from .timing import Sample, parallel


@dataclass(frozen=True)
class SdkAccess:
    """How the SDK reaches the NetHSM: host, operator credential and TLS trust."""

    host: str
    user: str
    password: str
    ca_file: str | None  # None with verify_tls False
    verify: bool


def sdk_access(uri: NetHSMURI, user: str, password: str, workdir: str) -> SdkAccess:
    """The SDK takes a CA file: the URI's ``ca=``, or the pinned certificate fetched and checked."""
    host, port = uri.hosts[0]
    params = uri.params
    if params.get("verify", "").lower() in ("false", "0", "no"):
        return SdkAccess(f"{host}:{port}", user, password, None, False)
    if "ca" in params:
        return SdkAccess(f"{host}:{port}", user, password, params["ca"], True)
    pin = params.get("fingerprint", "").lower().removeprefix("sha256:").replace(":", "")
    if not pin:
        return SdkAccess(f"{host}:{port}", user, password, None, True)
    pem = ssl.get_server_certificate((host, port))
    if hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() != pin:
        raise ConfigurationError(
            f"the certificate of {host}:{port} does not match the URI's fingerprint; "
            "the SDK baseline will not trust it"
        )
    fd, path = tempfile.mkstemp(prefix="nethsm-ca-", suffix=".pem", dir=workdir)
    with os.fdopen(fd, "w") as fh:
        fh.write(pem)
    return SdkAccess(f"{host}:{port}", user, password, path, True)


def _client(access: SdkAccess) -> Any:
    import nethsm

    return nethsm.NetHSM(
        access.host,
        nethsm.Authentication(access.user, access.password),
        verify_tls=access.verify,
        ca_certs=access.ca_file,
    )


def contenders(target: Target, access: SdkAccess | None) -> list[Contender]:
    """``nethsm-sdk``: the SDK's sign/decrypt in a loop, one client per thread."""
    if access is None or target.key is None:
        return []
    try:
        import nethsm
    except ImportError:
        return []
    key, mech, spec = target.key, target.mechanism, target.workload.spec
    _, mode = vocabulary.mode_for(mech)
    sign = target.workload.kind == "sign"
    sign_mode = nethsm.SignMode(mode) if sign else None
    decrypt_mode = None if sign else nethsm.DecryptMode(mode)

    def op(client: Any, data: bytes) -> object:
        """What an SDK user writes: hash (and prefix) the message, base64, call."""
        if sign:
            digest = vocabulary.ecdsa_input(signing_input(mech, data, prehashed=False), spec)
            return client.sign(key.id, nethsm.Base64.encode(digest), sign_mode)
        return client.decrypt(key.id, nethsm.Base64.encode(data), decrypt_mode)

    def run(threads: int, count: int) -> Sample:
        items = target.items(count)

        @contextlib.contextmanager
        def worker(_i: int) -> Iterator[Callable[[int], object]]:
            client = _client(access)
            try:
                yield lambda j: op(client, items[j])
            finally:
                client.close()

        return parallel(threads, count, worker)

    return [Contender("nethsm-sdk", run)]


def describe(access: SdkAccess | None, description: str) -> dict[str, Any]:
    """The appliance's ``/info`` (vendor, product) when the SDK can ask it."""
    info: dict[str, Any] = {"backend": "nethsm", "description": description}
    if access is None:
        return info
    try:
        client = _client(access)
        try:
            answer = client.get_info()
        finally:
            client.close()
        info["appliance"] = {"vendor": str(answer.vendor), "product": str(answer.product)}
    except Exception as exc:  # the description is optional; say why it is missing
        info["appliance"] = {"error": type(exc).__name__}
    return info
