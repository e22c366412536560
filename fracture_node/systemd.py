"""systemd service notification (``sd_notify``) and the watchdog, without libsystemd.

The protocol (``man sd_notify``, "Notes"): the service manager puts the address of an
``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET``; the service sends newline-separated
``KEY=VALUE`` assignments to it, one datagram per notification. An address that starts with ``@``
is in the abstract namespace (the ``@`` stands for a leading NUL byte). ``READY=1`` ends start-up
of a ``Type=notify`` unit, ``STOPPING=1`` announces a clean stop, ``STATUS=...`` is shown by
``systemctl status``, ``WATCHDOG=1`` keeps a unit with ``WatchdogSec=`` alive and
``EXTEND_TIMEOUT_USEC=`` asks for more time to start or stop.

``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set it must be our PID) says how often the
watchdog must be fed; ``sd_watchdog_enabled(3)`` recommends pinging at half that interval.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon calls these
unconditionally. Notification is best effort: a failure to send is logged and never raised, since
a node that cannot talk to systemd should still serve the PACS. A send waits at most
``send_timeout_s``: a datagram socket whose reader has stopped reading blocks the sender once its
queue is full (``net.unix.max_dgram_qlen``, 10 by default), and a stop must never wait on that.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

from fracture_node.logs import get_logger

log = get_logger("systemd")


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None when unusable."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # "vsock:CID:PORT" (systemd 253+, virtual machines) and anything else: not for us.
    return None


class Notifier:
    """Sends ``sd_notify`` datagrams to the service manager (or nothing, outside systemd).

    Parameters
    ----------
    address:
        The ``$NOTIFY_SOCKET`` value; empty or None makes every call a no-op.
    send_timeout_s:
        The longest one notification may wait for room in the manager's queue; after it the
        notification is dropped (logged once until a send succeeds again).
    """

    def __init__(self, address: str | None, send_timeout_s: float = 1.0) -> None:
        self.address = address or None
        self.send_timeout_s = send_timeout_s
        self._target = _socket_address(address) if address else None
        if address and self._target is None:
            log.warning("notify_socket_unsupported", notify_socket=address)
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` of ``environ`` (default: this process's environment)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._target is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if self._target is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        message = assignments[0].split("=", 1)[0]
        try:
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.send_timeout_s)
                sock.sendto(payload, self._target)
        except OSError as exc:  # TimeoutError included: the manager's queue stayed full
            if not self._failing:
                log.warning("notify_failed", message=message,
                            error=f"{type(exc).__name__}: {exc.strerror or exc}",
                            detail="notifications are dropped until the service manager "
                                   "reads them again")
            self._failing = True
            return False
        if self._failing:
            log.info("notify_resumed", message=message)
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is finished (``READY=1``): systemd marks the unit active."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status`` (``STATUS=...``)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Feed the watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """A clean stop has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to finish starting or stopping (``EXTEND_TIMEOUT_USEC=``)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None
                      ) -> float | None:
    """How often to feed the watchdog, in seconds: half of ``$WATCHDOG_USEC``.

    None when the watchdog is off: no or an invalid ``$WATCHDOG_USEC``, or ``$WATCHDOG_PID`` names
    another process (the variable was inherited from a parent).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class WatchdogThread:
    """Feeds the systemd watchdog while ``healthy()`` says the node works.

    When ``healthy`` returns False, raises, or hangs (a stuck database call), no ``WATCHDOG=1``
    is sent; after ``WatchdogSec=`` systemd kills the node (SIGABRT) and ``Restart=on-failure``
    starts it again. Give it a *liveness* check (the database answers, the parts' threads are
    alive), not the readiness answer of ``/health``, which turns false while the node drains on
    stop: systemd enforces the watchdog during a stop too.

    Parameters
    ----------
    notifier:
        Where the pings go; a disabled notifier makes the thread a no-op.
    interval_s:
        Seconds between pings, normally :func:`watchdog_interval`; None disables the thread.
    healthy:
        Called before each ping, from the watchdog thread.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None,
                 healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval_s is not None and self.interval_s > 0

    def start(self) -> None:
        """Start pinging (a no-op when not under a systemd watchdog)."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()
        log.info("watchdog_started", interval_s=self.interval_s)

    def stop(self) -> None:
        """Stop pinging; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def ping_once(self) -> bool:
        """Check health and ping if healthy; True when a ping was sent."""
        try:
            ok = bool(self.healthy())
            error = None
        except Exception as exc:  # the check is the node's; any failure means "not healthy"
            ok, error = False, type(exc).__name__
        if not ok:
            if self._was_healthy:
                log.error("watchdog_withheld", error=error,
                          detail="the node is not healthy; systemd will restart it "
                                 "unless it recovers within WatchdogSec")
            self._was_healthy = False
            return False
        if not self._was_healthy:
            log.info("watchdog_resumed")
        self._was_healthy = True
        return self.notifier.watchdog()

    def _loop(self) -> None:
        assert self.interval_s is not None
        self.ping_once()
        while not self._stop.wait(self.interval_s):
            self.ping_once()
