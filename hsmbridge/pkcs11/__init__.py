"""PKCS#11 backend on python-pkcs11.

Sessions and concurrency (the design, stated once; docs/design.md has the
measured facts behind it):

- **One module instance per process.** python-pkcs11 would initialise a
  module with ``C_Initialize(NULL)`` (single-threaded), yet releases the GIL
  around calls; ``module.py`` takes the function list itself, initialises
  exactly that instance with ``CKF_OS_LOCKING_OK`` (fact 1) and hands it to
  python-pkcs11 and the native engine (through the engine's own
  ``C_GetFunctionList`` for p11-kit, which makes a new instance per call). A
  module that refuses locking, or that another library initialised, is used by
  one thread; after ``fork()`` the child initialises it again.
- **One token, chosen and profiled.** ``slots.py`` picks the slot and token an
  RFC 7512 URI names; ``profile.py`` holds what was learned about it and the
  measured facts per module (concurrent sessions, bad padding); ``opening.py``
  retries a token that is briefly busy with another process.
- **One login per token and process.** Login belongs to the application, not
  the session, and closing a logged-in session logs every session out (fact
  2). ``pool.py`` keeps one long-lived login session per token and process
  (shared by every handle on it; a second handle must present the same PIN),
  plus, per handle, an admin R/W session for key management (serialised by a
  lock) and a bounded pool of worker sessions opened without a PIN, which
  inherit the login. A worker that fails with a session or device error is
  replaced and its operation repeated once.
- **Keys.** :class:`Pkcs11HSM` (``backend.py``) manages keys through the admin
  session; a :class:`Pkcs11Key` (``key.py``) runs sign/decrypt on worker
  sessions: the native engine binds N pooled sessions to N pthreads for one
  batch, the Python engine binds one session per thread. Keys are made
  non-copyable and non-modifiable (``templates.py``), so no session-object
  copies (fact 5): deleting a key ends every use of it, in every process.
- **What the token can do** is learned, not assumed (``capabilities.py``).
- **Finding keys** (``lookup.py``) also runs on the admin session: a listing
  is one search (two at most), however many keys the token holds, and
  ``get_key`` answers from a per-handle cache of key handles, each hit checked
  by one attribute read on the cached object.
"""

from .backend import Pkcs11HSM
from .key import Pkcs11Key

__all__ = ["Pkcs11HSM", "Pkcs11Key"]
