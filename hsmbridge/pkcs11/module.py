"""Loading a PKCS#11 module once per process, with OS locking turned on.

python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which tells
SoftHSM2 (and other modules) that the application is single-threaded, yet it
releases the GIL around every call: two threads signing on two sessions then
crash the process (docs/design.md, fact 1). Right after loading, before any session
is opened, we finalise the module and initialise it again with
``CKF_OS_LOCKING_OK`` through ctypes on the same loaded instance. A module that
answers ``CKR_CANT_LOCK`` is re-initialised as before and used by one thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import pkcs11

from ..errors import ModuleLoadError

log = logging.getLogger("hsmbridge.pkcs11")

CKR_OK = 0x0
CKR_CANT_LOCK = 0xA
CKF_OS_LOCKING_OK = 0x2

DEFAULT_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_CK_RV_FN = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionListHead(ctypes.Structure):
    """The first members of CK_FUNCTION_LIST: version, C_Initialize, C_Finalize."""

    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", _CK_RV_FN),
        ("C_Finalize", _CK_RV_FN),
    ]


@dataclass
class LoadedModule:
    """A module loaded by python-pkcs11 and re-initialised for threads."""

    path: str
    lib: Any  # pkcs11.lib
    #: False when the module refused OS locking: use it from one thread only.
    thread_safe: bool


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()


def resolve_module_path(path: str | None) -> str:
    """The module path given, else ``PKCS11_MODULE``, else a known SoftHSM2 path."""
    candidates = [path] if path else []
    if not path and os.environ.get("PKCS11_MODULE"):
        candidates = [os.environ["PKCS11_MODULE"]]
    if not candidates:
        candidates = list(DEFAULT_MODULE_PATHS)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    if path or os.environ.get("PKCS11_MODULE"):
        raise ModuleLoadError(
            f"PKCS#11 module {candidates[0]!r} does not exist; give the path of the token's "
            "shared library in the URI's module-path (e.g. /usr/lib/softhsm/libsofthsm2.so)"
        )
    raise ModuleLoadError(
        "no PKCS#11 module given and SoftHSM2 is not installed in a known place; add "
        "module-path=/path/to/module.so to the URI or set PKCS11_MODULE"
    )


def load_module(path: str | None) -> LoadedModule:
    """Load (once per process) and initialise the module with OS locking."""
    real = resolve_module_path(path)
    with _modules_lock:
        loaded = _modules.get(real)
        if loaded is None:
            loaded = _load(real)
            _modules[real] = loaded
        return loaded


def _load(path: str) -> LoadedModule:
    try:
        lib = pkcs11.lib(path)
    except Exception as exc:  # python-pkcs11 raises bare PKCS11Error/RuntimeError here
        raise ModuleLoadError(
            f"could not load PKCS#11 module {path!r} ({type(exc).__name__}: {exc}); check that it "
            "is a PKCS#11 shared library for this architecture and that its config "
            "(e.g. SOFTHSM2_CONF) is readable"
        ) from None
    thread_safe = _reinitialise_with_os_locking(path)
    if not thread_safe:
        log.warning("PKCS#11 module %s refused OS locking; batches will use one thread", path)
    return LoadedModule(path=path, lib=lib, thread_safe=thread_safe)


def _reinitialise_with_os_locking(path: str) -> bool:
    """C_Finalize(NULL), then C_Initialize({CKF_OS_LOCKING_OK}) on the same instance."""
    dll = ctypes.CDLL(path)
    get_list = dll.C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionListHead))]
    funcs = ctypes.POINTER(_FunctionListHead)()
    if get_list(ctypes.byref(funcs)) != CKR_OK:
        raise ModuleLoadError(f"C_GetFunctionList failed for PKCS#11 module {path!r}")
    head = funcs.contents
    rv = head.C_Finalize(None)
    if rv != CKR_OK:
        raise ModuleLoadError(f"C_Finalize failed (0x{rv:x}) while enabling OS locking in {path!r}")
    args = _InitArgs(flags=CKF_OS_LOCKING_OK)
    rv = head.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
    if rv == CKR_OK:
        return True
    # CKR_CANT_LOCK or any refusal: restore the state python-pkcs11 expects.
    rv2 = head.C_Initialize(None)
    if rv2 != CKR_OK:
        raise ModuleLoadError(
            f"PKCS#11 module {path!r} could not be re-initialised (0x{rv:x}, then 0x{rv2:x})"
        )
    return False


def load_native() -> Any:
    """The C batch engine (hsmbridge._native), or None when it was not built."""
    try:
        from .. import _native
    except ImportError:
        return None
    return _native
