"""NetHSM namespaces: who may see and manage which users and keys.

A user ID ``ns~name`` puts the user in namespace ``ns``; a plain ID is in the
root namespace (``""``). Keys belong to the namespace of the user who made
them: inside the bridge a namespaced key's ID is stored as ``ns~id`` (a NetHSM
key ID never holds ``~``, so the two cannot collide) and callers only ever see
and name the plain ID. The appliance's rules, applied here:

- a root Administrator (R-Administrator) manages namespaces, the root
  namespace's users and keys, and the users of namespaces that do not exist
  yet (so a namespace gets its first administrator before it is created);
- a namespace Administrator (N-Administrator) manages only its own namespace's
  users and keys and nothing system-wide (configuration, namespaces, system);
- the users of a namespace that does not exist (yet, or any more) may do
  nothing at all.
"""

from __future__ import annotations

from typing import Protocol

from .errors import ApiError

SEPARATOR = "~"


def namespace_of(user_id: str) -> str:
    """The namespace of a user or internal key ID; ``""`` for the root namespace."""
    ns, sep, _ = user_id.rpartition(SEPARATOR)
    return ns if sep else ""


def local_id(internal_id: str) -> str:
    """The ID a caller sees: ``id`` of ``ns~id``."""
    return internal_id.rpartition(SEPARATOR)[2]


def scoped(namespace: str, key_id: str) -> str:
    """The internal ID of key ``key_id`` in ``namespace``."""
    return f"{namespace}{SEPARATOR}{key_id}" if namespace else key_id


class _Namespaces(Protocol):
    def namespace_exists(self, namespace: str) -> bool: ...


def denied(what: str) -> ApiError:
    return ApiError(403, f"access denied: {what}")


def check_route(user_id: str, namespaced: bool) -> None:
    """Users of a namespace call only the namespaced routes (403): no I/O, so it runs
    before any body is read."""
    namespace = namespace_of(user_id)
    if namespace and not namespaced:
        raise denied(f"users of namespace {namespace} cannot do this")


def check_may_call(store: _Namespaces, user_id: str, namespaced: bool) -> None:
    """:func:`check_route`, and the caller's namespace exists (403 if not)."""
    check_route(user_id, namespaced)
    namespace = namespace_of(user_id)
    if namespace and not store.namespace_exists(namespace):
        raise denied(f"namespace {namespace} does not exist")


def check_manage_user(actor_id: str, target_id: str, namespace_exists: bool) -> None:
    """May administrator ``actor_id`` create, change or delete user ``target_id``? (else 403)

    ``namespace_exists`` says whether the target's namespace exists.
    """
    actor_ns, target_ns = namespace_of(actor_id), namespace_of(target_id)
    if actor_ns:
        if target_ns != actor_ns:
            raise denied(
                f"an administrator of namespace {actor_ns} manages only users {actor_ns}~..."
            )
        return
    if target_ns and namespace_exists:
        raise denied(
            f"namespace {target_ns} exists, so its users are managed by its own administrators"
        )


def can_read_user(actor_id: str, target_id: str) -> bool:
    """Root administrators see every user; namespace administrators their namespace's."""
    actor_ns = namespace_of(actor_id)
    return not actor_ns or namespace_of(target_id) == actor_ns
