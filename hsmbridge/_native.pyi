"""Type stub for the optional C batch engine built from native/batch.c."""

import os
from collections.abc import Sequence

OP_SIGN: int
OP_DECRYPT: int
MAX_SESSIONS: int
MAX_OUT_LEN: int

def run_batch(
    module_path: str | bytes | os.PathLike[str],
    op: int,
    sessions: Sequence[int],
    key_handle: int,
    mechanism: int,
    param: tuple[object, ...] | None,
    inputs: Sequence[bytes | bytearray | memoryview],
    out_len: int,
    stop_on_error: bool = False,
    ecdsa_der: bool = False,
    nice: int = 0,
    idle: bool = False,
) -> list[bytes | int | None]: ...
def use_function_list(module_path: str | bytes | os.PathLike[str], address: int) -> str:
    """run_batch(module_path, ...) uses the CK_FUNCTION_LIST at ``address`` from now on,
    and this extension's own C_GetFunctionList returns it; the extension's file."""

def ceiling(
    module_path: str | bytes | os.PathLike[str],
    op: int,
    sessions: Sequence[int],
    key_handle: int,
    mechanism: int,
    param: tuple[object, ...] | None,
    input: bytes | bytearray | memoryview,
    out_len: int,
    count: int,
    warmup: int = 1,
) -> tuple[float, float, int]: ...
