"""Loading a PKCS#11 module once per process, initialised by us, with OS locking.

python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which tells
SoftHSM2 (and other modules) that the application is single-threaded, yet it
releases the GIL around every call: two threads signing on two sessions then
crash the process (docs/design.md, fact 1). So hsmbridge takes the function list
itself (``C_GetFunctionList``), initialises exactly that instance once with
``CKF_OS_LOCKING_OK`` (and the module's ``pReserved`` string, which NSS softokn
needs), and hands python-pkcs11 and the native engine that same instance:

* Most modules return the same function list on every ``C_GetFunctionList``;
  python-pkcs11 loads the module itself and is told not to initialise it again.
* p11-kit's proxy and client hand out a new, uninitialised instance on every
  call. python-pkcs11 then loads the module *through* the native engine, whose
  own ``C_GetFunctionList`` returns the instance we initialised; the engine runs
  batches on it too. Without the native engine such a module is initialised by
  python-pkcs11 as usual and used from one thread.
* A module that another library in this process already initialised (an
  application using python-pkcs11 directly, perhaps under another path to the
  same file) is shared, never re-initialised underneath it, and used from one
  thread: how it was initialised is unknown.

After ``fork()`` a child must call ``C_Initialize`` again (PKCS#11 v2.40
section 6.6.1); :func:`ensure_initialised` does that once per process, on the
first use in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import _pkcs11

from ..errors import ConfigurationError, ModuleLoadError
from .errormap import rv_name

log = logging.getLogger("hsmbridge.pkcs11")

CKR_OK = 0x0
CKR_CANT_LOCK = 0xA
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x2

DEFAULT_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)

#: Where p11-kit looks for module configs (``NAME.module``), user's first.
P11_KIT_CONFIG_DIRS = (
    "~/.config/pkcs11/modules",
    "/etc/pkcs11/modules",
    "/usr/share/p11-kit/modules",
)


def _p11_kit_module_dir() -> str:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    return os.path.join("/usr/lib", multiarch, "pkcs11") if multiarch else "/usr/lib/pkcs11"


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_char_p),
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


_FunctionListPtr = ctypes.POINTER(_FunctionListHead)


class _UninitialisingLib(_pkcs11.lib):  # type: ignore[misc]
    """python-pkcs11's ``lib`` over a function list hsmbridge has initialised.

    ``initialize`` is a Cython ``cpdef`` method, so this override is what
    ``lib.__init__`` calls: the module is not initialised a second time, and
    since python-pkcs11 then never marks it initialised, it never finalises it.
    """

    def initialize(self) -> None:
        return None


@dataclass
class LoadedModule:
    """A module loaded and initialised for this process."""

    path: str
    lib: Any  # pkcs11.lib bound to ``functions``
    #: False when the module refused OS locking, or someone else initialised it:
    #: use it from one thread only.
    thread_safe: bool
    #: Address of the CK_FUNCTION_LIST python-pkcs11 and the native engine use.
    functions: int = 0
    #: The module hands out a new instance on every C_GetFunctionList (p11-kit).
    instance_per_call: bool = False
    #: Another library in this process initialised the module; never re-initialise it.
    shared: bool = False
    #: The native engine can run batches on ``functions``.
    native_ok: bool = False
    init_reserved: str | None = field(default=None, repr=False)
    pid: int = field(default_factory=os.getpid)
    #: Incremented on every re-initialisation (after fork): sessions, logins and
    #: object handles of an older generation are gone.
    generation: int = 0
    _dll: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def description(self) -> str:
        return f"PKCS#11 module {self.path!r}"

    def info(self) -> dict[str, str]:
        """CK_INFO as python-pkcs11 read it: library-manufacturer, -description, -version."""
        major, minor = self.lib.library_version
        return {
            "library-manufacturer": self.lib.manufacturer_id,
            "library-description": self.lib.library_description,
            "library-version": f"{major}.{minor}",
        }


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """Locks held by another thread at fork() stay held in the child: replace them."""
    global _modules_lock
    _modules_lock = threading.Lock()
    for module in _modules.values():
        module._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def resolve_module_path(path: str | None, name: str | None = None) -> str:
    """The module given by path or name, else ``PKCS11_MODULE``, else a known SoftHSM2 path."""
    if path and name:
        raise ConfigurationError("the URI gives both module-path and module-name; keep one of them")
    if name:
        return resolve_module_name(name)
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


def resolve_module_name(name: str) -> str:
    """RFC 7512 ``module-name``: p11-kit's module config ``NAME.module``, else
    ``NAME.so``/``libNAME.so`` in p11-kit's module directory."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigurationError(
            "module-name is a module's name without directory (e.g. softhsm2); "
            "use module-path= for a file"
        )
    module_dir = _p11_kit_module_dir()
    for directory in P11_KIT_CONFIG_DIRS:
        config = Path(os.path.expanduser(directory)) / f"{name}.module"
        if not config.is_file():
            continue
        target = _module_line(config)
        if target is None:
            raise ModuleLoadError(
                f"p11-kit module config {str(config)!r} has no 'module:' line; fix it or "
                "use module-path="
            )
        full = target if os.path.isabs(target) else os.path.join(module_dir, target)
        if not os.path.isfile(full):
            raise ModuleLoadError(
                f"the URI's module-name names {full!r} (from {str(config)!r}), which does not "
                "exist; install the module or fix the config"
            )
        return os.path.realpath(full)
    for filename in (f"{name}.so", f"lib{name}.so"):
        full = os.path.join(module_dir, filename)
        if os.path.isfile(full):
            return os.path.realpath(full)
    # The name is not repeated: whatever was typed there is not shown back.
    searched = ", ".join([*P11_KIT_CONFIG_DIRS, module_dir])
    raise ModuleLoadError(
        "the URI's module-name matches no p11-kit module config (NAME.module) and no "
        f"NAME.so or libNAME.so (searched {searched}); use a name `p11-kit list-modules` "
        "shows, or module-path=/path/to/module.so"
    )


def _module_line(config: Path) -> str | None:
    try:
        lines = config.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "module":
            return value.strip() or None
    return None


def load_module(
    path: str | None, *, name: str | None = None, init_reserved: str | None = None
) -> LoadedModule:
    """Load (once per process) and initialise the module with OS locking."""
    real = resolve_module_path(path, name)
    with _modules_lock:
        loaded = _modules.get(real)
        if loaded is None:
            loaded = _load(real, init_reserved)
            _modules[real] = loaded
        elif init_reserved is not None and init_reserved != loaded.init_reserved:
            raise ConfigurationError(
                f"{loaded.description} is already initialised in this process with other "
                "initialisation arguments (x-init-reserved); a process initialises a module "
                "once: use the same x-init-reserved everywhere"
            )
    ensure_initialised(loaded)
    return loaded


def _function_list(dll: Any, path: str) -> int:
    get_list = dll.C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    address = ctypes.c_void_p()
    rv = get_list(ctypes.byref(address))
    if rv != CKR_OK or not address.value:
        raise ModuleLoadError(
            f"C_GetFunctionList failed ({rv_name(rv)}) for PKCS#11 module {path!r}"
        )
    return int(address.value)


def _head(address: int) -> _FunctionListHead:
    return ctypes.cast(address, _FunctionListPtr).contents


def _initialise(address: int, init_reserved: str | None) -> int:
    """C_Initialize with OS locking (and pReserved); the CK_RV."""
    reserved = init_reserved.encode() if init_reserved is not None else None
    args = _InitArgs(flags=CKF_OS_LOCKING_OK, pReserved=reserved)
    return int(_head(address).C_Initialize(ctypes.addressof(args)))


def _initialise_single_threaded(address: int, init_reserved: str | None) -> int:
    if init_reserved is None:
        return int(_head(address).C_Initialize(None))
    args = _InitArgs(flags=0, pReserved=init_reserved.encode())
    return int(_head(address).C_Initialize(ctypes.addressof(args)))


def _load(path: str, init_reserved: str | None) -> LoadedModule:
    try:
        dll = ctypes.CDLL(path)
        first = _function_list(dll, path)
    except OSError as exc:
        raise ModuleLoadError(
            f"could not load PKCS#11 module {path!r} ({type(exc).__name__}: "
            f"{exc.strerror or exc}); check that it is a PKCS#11 shared library for this "
            "architecture"
        ) from None
    except AttributeError:
        raise ModuleLoadError(
            f"{path!r} does not export C_GetFunctionList; it is not a PKCS#11 module"
        ) from None
    per_call = _function_list(dll, path) != first
    native = load_native()
    if per_call and native is None:
        # Nothing can hand python-pkcs11 our instance: let it make and
        # initialise its own, and use it from one thread.
        log.warning(
            "PKCS#11 module %s hands out a new instance per C_GetFunctionList and the native "
            "engine is not built; using python-pkcs11's own instance from one thread",
            path,
        )
        lib = _python_pkcs11_lib(path, _pkcs11.lib)
        return LoadedModule(path, lib, False, instance_per_call=True, _dll=dll)

    rv = _initialise(first, init_reserved)
    thread_safe = rv == CKR_OK
    shared = rv == CKR_CRYPTOKI_ALREADY_INITIALIZED
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        # CKR_CANT_LOCK or another refusal of the arguments: one thread, no locking.
        single = _initialise_single_threaded(first, init_reserved)
        if single != CKR_OK:
            raise ModuleLoadError(
                f"C_Initialize of PKCS#11 module {path!r} failed ({rv_name(rv)} with OS "
                f"locking, {rv_name(single)} without); check the module's configuration"
                + (" and x-init-reserved" if init_reserved is not None else "")
            )
        log.warning(
            "PKCS#11 module %s refused OS locking (%s); batches will use one thread",
            path,
            rv_name(rv),
        )
    if shared:
        log.warning(
            "PKCS#11 module %s was already initialised by another library in this process "
            "(python-pkcs11 used directly?); sharing it, not re-initialising it, and using "
            "one session because how it was initialised is unknown",
            path,
        )
    lib = _existing_python_pkcs11_lib(path) if shared else None
    if lib is None:
        if per_call:
            assert native is not None
            lib = _python_pkcs11_lib(native.use_function_list(path, first), _UninitialisingLib)
        else:
            lib = _python_pkcs11_lib(path, _UninitialisingLib)
    if native is not None and not per_call:
        native.use_function_list(path, first)
    # An application that later asks python-pkcs11 for this module gets this
    # instance instead of initialising the module a second time.
    pkcs11._loaded.setdefault(path, lib)
    return LoadedModule(
        path,
        lib,
        thread_safe,
        functions=first,
        instance_per_call=per_call,
        shared=shared,
        native_ok=native is not None,
        init_reserved=init_reserved,
        _dll=dll,
    )


def _python_pkcs11_lib(path: str, cls: type) -> Any:
    try:
        return cls(path)
    except Exception as exc:  # python-pkcs11 raises bare PKCS11Error/RuntimeError here
        raise ModuleLoadError(
            f"could not open PKCS#11 module {path!r} with python-pkcs11 "
            f"({type(exc).__name__}); check that it is a PKCS#11 library for this "
            "architecture and that its config (e.g. SOFTHSM2_CONF) is readable"
        ) from None


def _existing_python_pkcs11_lib(path: str) -> Any:
    """python-pkcs11's ``lib`` for this file if the application made one, under any path."""
    for key, lib in list(pkcs11._loaded.items()):
        with contextlib.suppress(OSError):
            if os.path.realpath(key) == path:
                return lib
    return None


def ensure_initialised(module: LoadedModule) -> bool:
    """Initialise the module again in a forked child (once); True if that happened.

    Everything the parent opened (sessions, logins, object handles) is invalid
    afterwards; callers compare :attr:`LoadedModule.generation`.
    """
    if module.pid == os.getpid():
        return False
    with module._lock:
        if module.pid == os.getpid():
            return False
        _reinitialise_in_child(module)
        module.pid = os.getpid()
        module.generation += 1
    return True


def reinitialise_idle(module: LoadedModule) -> bool:
    """C_Finalize + C_Initialize a module this process owns and has no session on.

    SoftHSM2 reads its tokens at C_Initialize; one read while another process
    wrote a token file leaves the token looking uninitialised (or PIN-less)
    until the module is initialised again. The caller guarantees no session
    is open. False when the module is not ours to re-initialise.
    """
    if module.shared or not module.functions:
        return False
    with module._lock:
        _head(module.functions).C_Finalize(None)
        rv = _initialise(module.functions, module.init_reserved)
        if rv != CKR_OK and not module.thread_safe:
            rv = _initialise_single_threaded(module.functions, module.init_reserved)
        if rv != CKR_OK:
            raise ModuleLoadError(
                f"could not initialise {module.description} again ({rv_name(rv)})"
            )
        module.generation += 1
    log.info("re-initialised %s to read its tokens again", module.description)
    return True


def _reinitialise_in_child(module: LoadedModule) -> None:
    if not module.functions:  # python-pkcs11's own instance
        with contextlib.suppress(Exception):
            module.lib.finalize()
        try:
            module.lib.initialize()
        except Exception as exc:
            raise ModuleLoadError(
                f"could not initialise {module.description} again after fork() "
                f"({type(exc).__name__})"
            ) from None
        return
    rv = _initialise(module.functions, module.init_reserved)
    if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED and not module.shared:
        # The module kept the parent's state (SoftHSM2 unless library.reset_on_fork):
        # drop this process's copy of it and start clean.
        _head(module.functions).C_Finalize(None)
        rv = _initialise(module.functions, module.init_reserved)
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED) and not module.thread_safe:
        rv = _initialise_single_threaded(module.functions, module.init_reserved)
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise ModuleLoadError(
            f"could not initialise {module.description} again after fork() ({rv_name(rv)})"
        )
    log.info("re-initialised %s in child process %d", module.description, os.getpid())


def load_native() -> Any:
    """The C batch engine (hsmbridge._native), or None when it was not built."""
    try:
        from .. import _native
    except ImportError:
        return None
    return _native
