"""The sd_notify client talks the real protocol to a datagram socket of the test's own."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fracture_node.systemd import Notifier, WatchdogThread, watchdog_interval


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket
        sock.settimeout(2.0)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def receive_all(self, quiet_s: float = 0.2) -> list[str]:
        out: list[str] = []
        self.sock.settimeout(quiet_s)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except TimeoutError:
            return out
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A socket bound to a path in a short temporary folder (AF_UNIX paths are limited)."""
    folder = Path(tempfile.mkdtemp(prefix="fn-sd-", dir="/tmp"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Listener(sock, str(path))
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A socket bound in the abstract namespace, announced as ``@name`` like systemd does."""
    name = f"fracture-node-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Listener(sock, "@" + name)
    finally:
        sock.close()


def test_ready_sends_ready_datagram(listener: Listener) -> None:
    """ready() sends READY=1 to the socket named by NOTIFY_SOCKET."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.notify_socket})
    assert notifier.ready()
    assert listener.receive() == "READY=1"


def test_ready_with_status_is_one_datagram(listener: Listener) -> None:
    """ready(status) sends READY=1 and STATUS= together, newline-separated, in one datagram."""
    Notifier(listener.notify_socket).ready("listening on\n11112")
    assert listener.receive() == "READY=1\nSTATUS=listening on 11112"


def test_watchdog_sends_watchdog_datagram(listener: Listener) -> None:
    """watchdog() sends WATCHDOG=1."""
    Notifier(listener.notify_socket).watchdog()
    assert listener.receive() == "WATCHDOG=1"


def test_stopping_sends_stopping_datagram(listener: Listener) -> None:
    """stopping() sends STOPPING=1."""
    Notifier(listener.notify_socket).stopping()
    assert listener.receive() == "STOPPING=1"


def test_status_and_extend_timeout(listener: Listener) -> None:
    """status() sends STATUS=text and extend_timeout() sends microseconds."""
    notifier = Notifier(listener.notify_socket)
    notifier.status("queue 3")
    notifier.extend_timeout(2.5)
    assert listener.receive_all() == ["STATUS=queue 3", "EXTEND_TIMEOUT_USEC=2500000"]


def test_abstract_namespace_address(abstract_listener: Listener) -> None:
    """An address starting with '@' reaches a socket in the abstract namespace."""
    Notifier.from_environ({"NOTIFY_SOCKET": abstract_listener.notify_socket}).ready()
    assert abstract_listener.receive() == "READY=1"


def test_no_notify_socket_is_a_noop() -> None:
    """Without NOTIFY_SOCKET every call returns False and nothing is sent."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that nobody listens on makes notify() return False instead of raising."""
    assert not Notifier(str(tmp_path / "absent")).ready()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=30000000 gives a 15 second ping interval."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_watchdog_interval_for_our_pid() -> None:
    """WATCHDOG_PID equal to our PID keeps the watchdog on."""
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 0.5


def test_watchdog_interval_for_another_pid_is_none() -> None:
    """WATCHDOG_PID naming another process (inherited variable) turns the watchdog off."""
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(env) is None


@pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
def test_watchdog_interval_off(value: str) -> None:
    """A missing, zero, negative or unparsable WATCHDOG_USEC turns the watchdog off."""
    assert watchdog_interval({"WATCHDOG_USEC": value} if value else {}) is None


def test_watchdog_thread_pings_while_healthy(listener: Listener) -> None:
    """The thread sends WATCHDOG=1 repeatedly while the health check passes."""
    thread = WatchdogThread(Notifier(listener.notify_socket), 0.05, lambda: True)
    thread.start()
    try:
        pings = [listener.receive() for _ in range(3)]
    finally:
        thread.stop()
    assert pings == ["WATCHDOG=1"] * 3


def test_watchdog_thread_withholds_pings_when_unhealthy(listener: Listener) -> None:
    """No WATCHDOG=1 is sent while the check fails or raises, and pings resume when it passes."""
    healthy = threading.Event()
    calls = {"n": 0}

    def check() -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("database hung up")
        return healthy.is_set()

    thread = WatchdogThread(Notifier(listener.notify_socket), 0.05, check)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while calls["n"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls["n"] >= 3
        assert listener.receive_all(quiet_s=0.1) == []
        healthy.set()
        assert listener.receive() == "WATCHDOG=1"
    finally:
        thread.stop()


def test_watchdog_thread_disabled_without_interval(listener: Listener) -> None:
    """Without a watchdog interval the thread does not start and sends nothing."""
    thread = WatchdogThread(Notifier(listener.notify_socket), None, lambda: True)
    thread.start()
    thread.stop()
    assert not thread.enabled
    assert listener.receive_all(quiet_s=0.1) == []


def test_a_manager_that_stops_reading_never_blocks_a_notification(listener: Listener) -> None:
    """Once the manager's queue is full, a notification waits at most send_timeout_s and is
    dropped (logged once), and the stop's STOPPING=1 is not held up behind a blocked ping; when
    the manager reads again, notifications go through again."""
    from structlog.testing import capture_logs

    notifier = Notifier(listener.notify_socket, send_timeout_s=0.05)
    started = time.monotonic()
    with capture_logs() as logs:
        sent = [notifier.watchdog() for _ in range(40)]
        stopping = notifier.stopping("draining")
    elapsed = time.monotonic() - started
    assert sent[0] and not sent[-1]
    assert not stopping
    assert elapsed < 0.05 * 30 + 5, elapsed  # a blocking send would have hung here for good
    assert [e["event"] for e in logs].count("notify_failed") == 1
    queued = listener.receive_all()
    assert queued and all(m == "WATCHDOG=1" for m in queued)
    assert len(queued) == sum(sent)
    with capture_logs() as logs:
        assert notifier.stopping("draining")
    assert [e["event"] for e in logs] == ["notify_resumed"]
    assert listener.receive() == "STOPPING=1\nSTATUS=draining"


def test_watchdog_thread_stops_while_the_manager_is_not_reading(listener: Listener) -> None:
    """A watchdog thread pinging into a full queue still stops within its join time."""
    thread = WatchdogThread(Notifier(listener.notify_socket, send_timeout_s=0.2), 0.01,
                            lambda: True)
    thread.start()
    time.sleep(0.5)  # far more pings than the queue holds
    started = time.monotonic()
    thread.stop()
    assert time.monotonic() - started < 2.0
    assert thread._thread is None
