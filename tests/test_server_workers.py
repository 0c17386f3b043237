"""The server's request threads (hsmbridge/server/workers.py): results, errors, the thread cap,
a cancelled request, and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hsmbridge.server.workers import Workers


def test_results_errors_and_at_most_max_threads() -> None:
    workers = Workers(2, "test-req")
    running: set[str] = set()
    most = 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal most
        with lock:
            running.add(threading.current_thread().name)
            most = max(most, len(running))
        time.sleep(0.02)
        with lock:
            running.discard(threading.current_thread().name)
        if i == 3:
            raise ValueError("job 3 failed")
        return i * i

    async def main() -> list[object]:
        return await asyncio.gather(
            *(workers.run(job, i) for i in range(6)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert results[:3] == [0, 1, 4] and results[4:] == [16, 25]
    assert isinstance(results[3], ValueError) and str(results[3]) == "job 3 failed"
    assert most == 2 and len(workers._threads) == 2  # never more than max_threads
    workers.shutdown()
    for thread in workers._threads:
        thread.join(5)
        assert not thread.is_alive()


def test_a_cancelled_request_leaves_the_worker_usable() -> None:
    workers = Workers(1, "test-req")
    release = threading.Event()

    loop_errors: list[object] = []

    async def main() -> str:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        slow = asyncio.ensure_future(workers.run(release.wait, 5))
        await asyncio.sleep(0.01)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        release.set()  # the job finishes after its request was cancelled: nothing is raised
        return str(await workers.run(str.upper, "ok"))

    assert asyncio.run(main()) == "OK"
    assert loop_errors == []  # the late result was dropped, not set on the cancelled future
    workers.shutdown()
    workers._threads[0].join(5)


def test_threads_end_when_the_interpreter_exits_without_shutdown() -> None:
    """A forced exit skips the server's shutdown: the process must still end."""
    import subprocess
    import sys

    script = (
        "import asyncio\n"
        "from hsmbridge.server.workers import Workers\n"
        "w = Workers(2, 'exit-test')\n"
        "async def main():\n"
        "    assert await w.run(lambda: 41 + 1) == 42\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)
    assert done.returncode == 0
