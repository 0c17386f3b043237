"""The public API, pinned: what ``from hsmbridge import *`` gives is a decision, not an accident.

Adding or removing a name means editing the list here too (as httpx's
``test_exported_members`` does). Each ``__all__`` is checked three ways: it is
exactly the expected names, every name in it is importable, and nothing the
package defines publicly is left out of it.
"""

from __future__ import annotations

import importlib
import types

import pytest

EXPORTS: dict[str, list[str]] = {
    "hsmbridge": [
        "EC",
        "HSM",
        "Ed25519",
        "RSA",
        "AmbiguousKey",
        "AuthenticationError",
        "BatchItemError",
        "ConfigurationError",
        "DecryptionFailed",
        "HSMError",
        "HSMUnavailable",
        "InvalidInput",
        "Key",
        "KeyExists",
        "KeyExpired",
        "KeyInfo",
        "KeyNotExtractable",
        "KeyNotFound",
        "KeyNotYetValid",
        "KeyRing",
        "KeySpec",
        "KeyVersion",
        "Mechanism",
        "MechanismNotSupported",
        "ModuleLoadError",
        "OneTimeKey",
        "OneTimeKeys",
        "PermissionDenied",
        "PoolExhausted",
        "RateLimited",
        "TokenNotFound",
        "open",
        "parse_key_spec",
    ],
    "hsmbridge.errors": [
        "AmbiguousKey",
        "AuthenticationError",
        "BatchItemError",
        "ConfigurationError",
        "DecryptionFailed",
        "HSMError",
        "HSMUnavailable",
        "InvalidInput",
        "KeyExists",
        "KeyNotExtractable",
        "KeyExpired",
        "KeyNotFound",
        "KeyNotYetValid",
        "MechanismNotSupported",
        "ModuleLoadError",
        "PermissionDenied",
        "PoolExhausted",
        "RateLimited",
        "TokenNotFound",
    ],
    "hsmbridge.aio": ["AsyncHSM", "AsyncKey", "open"],
    "hsmbridge.pkcs11": ["Pkcs11HSM", "Pkcs11Key"],
    "hsmbridge.nethsm": ["Credential", "NetHSM", "NetHSMKey", "TLSConfig"],
    "hsmbridge.server": ["serve", "start_in_thread"],
    "hsmbridge.testing": [
        "SoftToken",
        "make_tokens",
        "softhsm_hsm",
        "softhsm_token",
        "softhsm_tokens",
    ],
}


def _defined_here(name: str, value: object) -> bool:
    """A public name whose object comes from hsmbridge (not a submodule, not an import helper)."""
    return (
        not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and str(getattr(value, "__module__", "")).startswith("hsmbridge")
    )


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_all_is_exactly_the_expected_names(module_name: str) -> None:
    exported = importlib.import_module(module_name).__all__
    assert len(set(exported)) == len(exported), f"{module_name}.__all__ repeats a name"
    assert sorted(exported) == sorted(EXPORTS[module_name])


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_every_exported_name_is_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        namespace: dict[str, object] = {}
        exec(f"from {module_name} import {name}", namespace)  # the user's spelling
        assert namespace[name] is getattr(module, name)


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_nothing_public_is_missing_from_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    public = {name for name, value in vars(module).items() if _defined_here(name, value)}
    if not hasattr(module, "__path__"):  # a plain module: what it imports is not its own
        public = {n for n in public if getattr(module, n).__module__ == module_name}
    assert public - set(module.__all__) == set()


def test_package_all_matches_errors_all() -> None:
    """Every exception class is reachable from the top level, under the same name."""
    import hsmbridge
    import hsmbridge.errors

    assert set(hsmbridge.errors.__all__) <= set(hsmbridge.__all__)
    for name in hsmbridge.errors.__all__:
        assert getattr(hsmbridge, name) is getattr(hsmbridge.errors, name)
