"""``hsmbridge serve``: the NetHSM REST API v1 over any hsmbridge backend.

Services written against the NetHSM API (and the official ``nethsm`` SDK) run
unchanged against a PKCS#11 token such as SoftHSM2. See docs/server.md.

    from hsmbridge.server.run import serve, start_in_thread
"""

from __future__ import annotations

__all__ = ["serve", "start_in_thread"]


def __getattr__(name: str) -> object:
    # Lazy: importing hsmbridge.server must not need the `server` extra.
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
