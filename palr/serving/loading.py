"""Model loading off the event loop, in threads that a stop does not wait for.

A server loads its model in a thread, so health keeps answering meanwhile (seconds for the demo's LLM,
minutes for a 7B one). `asyncio.to_thread` would use the loop's default executor, which `asyncio.run`
joins on the way out: a SIGTERM during loading stopped the port at once, then kept the process alive
until the load ended, past an orchestrator's grace period. `in_load_thread` runs the work in a daemon
thread instead; a load that a stop cancelled is abandoned, and `exit_if_loads_abandoned` ends the
process without joining it (nothing it was loading is in use, and nothing of it needs saving).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_running: set[threading.Thread] = set()  # load threads not yet returned
_lock = threading.Lock()


async def in_load_thread(work: Callable[..., T], *args: Any, on_abandoned: Callable[[T], Any] | None = None) -> T:
    """`work(*args)` in a daemon thread; its result (or exception) when it returns. Cancelling the await
    abandons the thread: it runs on, its outcome is dropped (`on_abandoned(result)` runs on it, in a thread of its
    own: an engine built for a server that stopped meanwhile is closed, not left running), and the process may exit
    without it."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not outcome.done():  # not cancelled meanwhile
            setter(value)
        elif on_abandoned is not None and setter == outcome.set_result:
            _start(f"abandon-{getattr(work, '__name__', 'work')}", lambda: on_abandoned(value))

    def report(setter: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle, setter, value)
        except RuntimeError:  # the loop has closed: nobody waits for this load any more
            pass

    def run() -> None:
        try:
            result = work(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the awaiting task, which re-raises it)
            settled = (outcome.set_exception, e)
        else:
            settled = (outcome.set_result, result)
        with _lock:  # off the list before the caller hears: once it has, this load is not unfinished
            _running.discard(thread)
        report(*settled)

    thread = threading.Thread(target=run, name=f"load-{getattr(work, '__name__', 'work')}", daemon=True)
    with _lock:
        _running.add(thread)
    thread.start()
    try:
        return await outcome
    except asyncio.CancelledError:  # a stop: after the result arrived but before this task resumed, it is here
        if on_abandoned is not None and outcome.done() and not outcome.cancelled() and outcome.exception() is None:
            _start(f"abandon-{getattr(work, '__name__', 'work')}", lambda: on_abandoned(outcome.result()))
        raise


def _start(name: str, target: Callable[[], None]) -> threading.Thread:
    """A daemon thread counted in `unfinished_loads` until `target` returns (so a process exiting meanwhile ends
    without tearing the interpreter down beside it)."""
    def run() -> None:
        try:
            target()
        except Exception:  # noqa: BLE001 - an abandoned result's cleanup failing concerns nobody waiting
            log.exception("%s failed", name)
        finally:
            with _lock:
                _running.discard(thread)

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _lock:
        _running.add(thread)
    thread.start()
    return thread


def unfinished_loads() -> list[str]:
    """Names of the load threads still running (abandoned by a stop, when the loop has ended)."""
    with _lock:
        return sorted(t.name for t in _running if t.is_alive())


def exit_if_loads_abandoned(code: int = 0) -> None:
    """Ends the process now (`os._exit(code)`, logs flushed) when a stopped load's thread still runs; joining
    it could take minutes, and running the interpreter's teardown beside a thread inside native model code
    could crash. Returns when no load is left."""
    left = unfinished_loads()
    if not left:
        return
    log.info("exiting without waiting for the model load under way (%s)", ", ".join(left))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
