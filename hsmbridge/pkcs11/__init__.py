"""PKCS#11 backend on python-pkcs11: module loading, session pool, key types."""

from .backend import Pkcs11HSM, Pkcs11Key

__all__ = ["Pkcs11HSM", "Pkcs11Key"]
