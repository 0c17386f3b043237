"""The state directory: private to the server's user, and refused if anyone else can write it.

It holds the argon2 hashes of every passphrase (SQLite database, WAL and
shared-memory files) and the TLS private key. The directory is made 0700 and
every file in it 0600; SQLite gives its -wal and -shm files the database
file's mode, so creating that file 0600 first covers them. A directory that
another user owns, or that group or others may write, could have its files
swapped under the server: the server refuses to start on it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ..errors import ConfigurationError

log = logging.getLogger("hsmbridge.server")

DIR_MODE = 0o700
FILE_MODE = 0o600


def prepare(state_dir: Path) -> Path:
    """Create ``state_dir`` 0700 or check an existing one; make its files 0600."""
    try:
        state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = state_dir.stat()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the state directory {state_dir}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"the state directory {state_dir} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigurationError(
            f"the state directory {state_dir} belongs to uid {info.st_uid}, not to the server's "
            f"user (uid {os.geteuid()}); use a directory of the server's own user"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise ConfigurationError(
            f"the state directory {state_dir} is writable by group or others (mode "
            f"{mode:04o}); run 'chmod 700 {state_dir}' or choose another directory"
        )
    if mode != DIR_MODE:
        state_dir.chmod(DIR_MODE)
        log.info("state directory %s: mode %04o -> %04o", state_dir, mode, DIR_MODE)
    for path in state_dir.iterdir():
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(FILE_MODE)
            log.info("state file %s: made private (0600)", path.name)
    return state_dir


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (before SQLite opens it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` with mode 0600 (also when it existed with another mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), FILE_MODE)
        fh.write(data)
