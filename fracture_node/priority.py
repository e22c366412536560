"""CPU priority of the scoring threads, so that the receiver keeps the CPU it needs.

On a server with few cores the model takes every core it is given; a C-STORE arriving meanwhile
would then wait for CPU time, and the modality or PACS that sends it waits for its response.
The worker therefore runs at a higher niceness (``[model] nice``, default 10) than the rest of
the node: the kernel gives the receiver, the web console and the report and delivery passes the
CPU first, and the model every cycle they leave.

On Linux the niceness is a property of each thread and a thread starts with its creator's, so
lowering the worker thread lowers its decode threads too, and an inference engine whose thread
pool is created inside :func:`call_niced` (ONNX Runtime's intra-op pool, created with its
session; OpenVINO's, with its compiled model) inherits it as well. Raising one's own niceness needs no privilege; lowering it back
would, so the main thread is never touched. Elsewhere (no ``os.setpriority``) this does nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from fracture_node.logs import get_logger

log = get_logger("priority")

T = TypeVar("T")


def thread_nice() -> int | None:
    """This thread's niceness (None where the platform cannot say)."""
    if not hasattr(os, "getpriority"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


def lower_current_thread(nice: int) -> None:
    """Make this thread at least ``nice`` nice (0: leave it); threads it starts inherit it."""
    current = thread_nice()
    if nice <= 0 or current is None or current >= nice:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # a seccomp filter or an exotic kernel: run at the usual priority
        log.warning("priority_unchanged", nice=nice, error=exc.strerror)


def call_niced(fn: Callable[[], T], nice: int, name: str = "niced") -> T:
    """``fn()`` run in a thread of niceness ``nice``, so that the threads it starts (an engine's
    pool) are as nice; returns its result or raises its exception. The caller's own priority is
    unchanged."""
    if nice <= 0:
        return fn()
    box: dict[str, object] = {}

    def run() -> None:
        lower_current_thread(nice)
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller as is
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
