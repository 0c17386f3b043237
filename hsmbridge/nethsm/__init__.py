"""NetHSM backend: the key API over the Nitrokey NetHSM REST API (``/api/v1``)."""

from .backend import NetHSM, NetHSMKey
from .client import Credential, TLSConfig

__all__ = ["Credential", "NetHSM", "NetHSMKey", "TLSConfig"]
