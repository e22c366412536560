"""The composition root: builds every part of a node from its configuration, starts, stops.

Stopping (SIGTERM, SIGINT): stop accepting associations, let in-flight stores finish, let the
worker finish its batch, then exit 0. Whatever was not finished stays in SQL and resumes at the
next start.
"""

from __future__ import annotations

import datetime as dt
import inspect
import os
import select
import signal
import threading
import time
import traceback
from types import FrameType
from typing import Any

from fracture_node import __version__, logs
from fracture_node.allocator import allocator_name
from fracture_node.config import Config
from fracture_node.db import migrate
from fracture_node.db.store import Store
from fracture_node.dicom.scp import Receiver, node_name
from fracture_node.errors import StartupError, describe
from fracture_node.metrics import Metrics, MetricsServer
from fracture_node.priority import call_niced
from fracture_node.scheduler import Scheduler
from fracture_node.spool import Spool
from fracture_node.stages import claims
from fracture_node.systemd import Notifier, WatchdogThread, watchdog_interval

log = logs.get_logger("daemon")


class Daemon:
    """One running node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.store: Store | None = None
        self.receiver: Receiver | None = None
        self.metrics_server: MetricsServer | None = None
        self.http_server: Any = None
        self.stow: Any = None
        self._parts: list[Any] = []
        self.worker: Any = None
        self.reporter: Any = None
        self.deliverer: Any = None
        self.scheduler: Scheduler | None = None
        self.housekeeping: Any = None
        self.notifier = Notifier.from_environ(os.environ)
        self.watchdog: WatchdogThread | None = None
        self.wake = threading.Event()
        self._stopping_part: str | None = None
        self._signal: int | None = None
        """The SIGTERM or SIGINT received (set by the signal handler, nothing else is)."""

    # Life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Build and start every part; returns once the node listens."""
        cfg = self.config
        os.umask(0o077)  # database, spool and reports hold patient data: owner only
        json_logs = {"auto": None, "json": True, "console": False}[cfg.logging.format]
        logs.configure(cfg.logging.level, json=json_logs)
        log.info("node_starting", version=__version__, config_source=cfg.source,
                 allocator=allocator_name(), settings=cfg.redacted())
        cfg.node.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.notifier.extend_timeout(600)  # a long schema upgrade must not hit TimeoutStartSec
        if cfg.database.auto_upgrade:
            revision = migrate.upgrade(cfg.database_url)
            log.info("schema_ready", revision=revision)
        self.store = Store(cfg.database_url, echo=cfg.database.echo)
        self.store.ping()
        spool = Spool(cfg.spool_dir, fsync=cfg.storage.fsync,
                      min_free_bytes=cfg.storage.min_free_bytes)
        # On SQLite this process is the only writer: any temporary file is a crash's leftover.
        swept = spool.sweep_temporaries(0 if not self.store.is_postgres else 3600)
        if swept:
            log.warning("spool_temporaries_removed", count=swept)
        # Every port first, before the model loads and before anything is stored: a port that
        # is taken ends start-up here, naming it. Callers wait in the backlog until we serve.
        if cfg.metrics.enabled:
            self.metrics_server = _bind(
                "metrics_port", "[metrics] port", cfg.metrics.host, cfg.metrics.port,
                lambda: MetricsServer(self.metrics, self.health, cfg.metrics.host,
                                      cfg.metrics.port))
        if cfg.http.enabled:
            from fracture_node.web.server import node_server
            from fracture_node.web.stow import stow_service

            self.stow = stow_service(cfg, self.store, spool, self.wake.set, self.metrics)
            routers, extra = self.stow.mount() if self.stow else ((), {})
            self.http_server = _bind("http_port", "[http] port", cfg.http.host, cfg.http.port,
                                     lambda: node_server(cfg, self.store, self._actions_done,
                                                         routers=routers, extra=extra))
        if cfg.node.role in ("all", "receiver"):
            self.receiver = Receiver(cfg, self.store, spool, on_stored=self.wake.set,
                                     metrics=self.metrics)
            _bind("dicom_port", "[node] port", cfg.node.bind_address, cfg.node.port,
                  self.receiver.bind)
            if self.stow is not None:  # STOW-RS rows carry the SCP's node name
                self.stow.node = self.receiver.node
        classifier = None
        if cfg.node.role in ("all", "worker"):
            # Load the model before serving: a node that cannot score must not accept.
            from fracture_node.ml.infer import Classifier

            # Loaded in a thread at the worker's niceness: an engine's thread pool, created
            # with its session, inherits it (fracture_node/priority.py).
            classifier = call_niced(lambda: Classifier.load(
                cfg.model.path, cfg.model.device, engine=cfg.model.engine,
                threads=cfg.model.threads, sub_batch=cfg.model.sub_batch or None,
                saliency=((cfg.saliency.method, cfg.saliency.layer) if cfg.saliency.enabled
                          else None),
                cache_dir=cfg.node.state_dir / "models"), cfg.model.nice, "model-load")
        if self.receiver is not None:
            closed = self.store.interrupt_open_associations(self.receiver.node)
            if closed:
                log.warning("associations_interrupted", count=closed)
        node = self.receiver.node if self.receiver else node_name(cfg.node.port)
        from fracture_node.stages.housekeeping import Housekeeping

        # One scheduler for the report and delivery passes and housekeeping; parts stop in
        # reverse: the worker, then housekeeping (told to stop), then the scheduler (waits).
        self.scheduler = Scheduler()
        self._parts.append(self.scheduler)
        self.housekeeping = Housekeeping(cfg, self.store, spool, self.metrics, node)
        self.housekeeping.start(self.scheduler)
        self._parts.append(self.housekeeping)
        if classifier is not None:
            self._start_processing(spool, node, classifier)
        self.scheduler.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        if self.http_server is not None:
            self.http_server.start()
        if self.receiver is not None:
            self.receiver.serve()  # every part is ready: the first association may come
        self.metrics.up.set(1)
        log.info("node_started", role=cfg.node.role,
                 port=self.receiver.port if self.receiver else None)
        self.notifier.ready(f"listening on port {self.receiver.port}" if self.receiver
                            else f"role {cfg.node.role}")
        self.watchdog = WatchdogThread(self.notifier, watchdog_interval(os.environ), self._alive)
        self.watchdog.start()

    def _alive(self) -> bool:
        """Liveness for the systemd watchdog: the database answers and the worker thread runs
        (not /health, which turns false while draining)."""
        assert self.store is not None
        self.store.ping()
        return self.worker is None or self.worker.alive()

    def _start_processing(self, spool: Spool, node: str, classifier: Any) -> None:
        """The worker (model), and the reporter and the deliverer on the node's scheduler."""

        from fracture_node.dicom.report import AlgorithmInfo
        from fracture_node.stages.deliver import Deliverer
        from fracture_node.stages.report import Reporter
        from fracture_node.stages.score import Worker

        cfg = self.config
        assert self.store is not None
        if self.store.is_postgres is False:
            # SQLite: this process is the only worker, so any claim left is from a run that
            # stopped; take it back now rather than after claim_timeout_s.
            claims.take_back(self.store, cfg.model, "start", older_than=dt.timedelta(0))
            # Likewise a delivery lease; a restart also retries deliveries in back-off at once
            # (an administrator who fixed the PACS and restarted expects them to go now).
            resumed = self.store.make_deliveries_due()
            if resumed:
                log.warning("deliveries_resumed", count=resumed)
        self.deliverer = Deliverer(cfg, self.store, node, metrics=self.metrics)
        scheduler = self.scheduler
        assert scheduler is not None
        self.reporter = Reporter(
            cfg, self.store, spool, node,
            AlgorithmInfo(name=classifier.name, version=classifier.version,
                          sha256=classifier.sha256,
                          threshold=classifier.threshold(cfg.model.operating_point),
                          operating_point=cfg.model.operating_point),
            metrics=self.metrics,
            on_report=lambda: scheduler.poke("deliver"),
            on_quiet_at=lambda when: scheduler.poke_at("report", when))
        self.worker = Worker(cfg, self.store, spool, classifier, node, wake=self.wake,
                             metrics=self.metrics, on_batch=lambda: scheduler.poke("report"))
        scheduler.add("report", self.reporter.run_once, 0.25)
        scheduler.add("deliver", self.deliverer.run_once, 1.0)
        self.worker.start()
        self._parts.append(self.worker)

    def _actions_done(self) -> None:
        """A console or API action made work due: report and deliver now."""
        self.wake.set()
        if self.scheduler is not None:
            self.scheduler.poke("report")
            self.scheduler.poke("deliver")

    def health(self) -> dict[str, Any]:
        """What ``/health`` answers: ok only when the database answers and the SCP listens."""
        state: dict[str, Any] = {"version": __version__, "role": self.config.node.role}
        try:
            assert self.store is not None
            self.store.ping()
            state["database"] = "ok"
        except Exception as exc:  # health reports, it never raises
            state["database"] = f"error: {type(exc).__name__}"
        state["ok"] = state["database"] == "ok" and not self.stopping.is_set()
        return state

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop every part in order, within ``timeout_s`` (``[node] stop_timeout_s``); safe to
        call twice, and after a start that failed half-way.

        Associations in flight get half the time to finish; the worker, the report and delivery
        jobs and housekeeping what is left. A part still busy at the deadline is left behind
        (logged): its work is in SQL and resumes at the next start.
        """
        self.stopping.set()
        timeout_s = self.config.node.stop_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.notifier.stopping("draining")
        log.info("node_stopping", timeout_s=timeout_s)
        done = threading.Event()
        stopper = threading.Thread(target=self._stop_parts, args=(deadline, done),
                                   name="stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if not done.is_set():
            log.error("node_stop_timed_out", timeout_s=timeout_s, waiting_for=self._stopping_part,
                      detail="left running; its work resumes from SQL at the next start")
        self.metrics.up.set(0)
        log.info("node_stopped", complete=done.is_set())

    def _stop_parts(self, deadline: float, done: threading.Event) -> None:
        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        try:
            if self.http_server is not None:  # no console action or upload while draining
                self._stopping_part = "http"
                self.http_server.stop(timeout_s=left() / 2)
                self.http_server = None
            if self.receiver is not None:
                self._stopping_part = "scp"
                self.receiver.stop(drain_timeout_s=left() / 2)
            for part in reversed(self._parts):
                self._stopping_part = type(part).__name__.strip("_").lower()
                _stop_within(part, left())
            self._parts.clear()
            if self.metrics_server is not None:
                self._stopping_part = "metrics"
                self.metrics_server.stop()
                self.metrics_server = None
            if self.watchdog is not None:  # systemd enforces the watchdog while stopping too
                self._stopping_part = "watchdog"
                self.watchdog.stop()
                self.watchdog = None
            if self.store is not None:
                self._stopping_part = "database"
                self.store.dispose()
            self._stopping_part = None
            done.set()
        except Exception as exc:  # stop what can be stopped; say what could not
            log.error("node_stop_failed", part=self._stopping_part, error=describe(exc))

    def run(self) -> int:
        """Start, wait for SIGTERM or SIGINT, stop; the exit code (1 when start-up failed).

        The signal handler only records the signal; the main loop, woken through
        :func:`signal.set_wakeup_fd` (a byte written from C), logs it and stops. A Python signal
        handler runs on the main thread between two bytecodes, possibly while that thread holds
        a lock: the log's write lock (structlog's is not reentrant) or the lock inside an
        ``Event``. A handler that logged or set an Event could wait on that lock for good, and the
        node would never stop (a SIGTERM that came in the instant the main thread logged did
        that). A signal during start-up is acted on once start-up ends.
        """
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.start()
            except Exception as exc:  # one event naming what failed, never a raw traceback
                part = getattr(exc, "part", None) or _failed_part(exc)
                log.error("node_start_failed", part=part, error=describe(exc))
                self.stop(timeout_s=min(10.0, self.config.node.stop_timeout_s))
                return 1
            while self._signal is None and not self.stopping.is_set():
                select.select([wake_r], [], [], 1.0)
                _drain(wake_r)
            if self._signal is not None:
                log.info("signal_received", signal=signal.Signals(self._signal).name)
            self.stop()
            return 0
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM or SIGINT: recorded, nothing else (see :meth:`run`)."""
        self._signal = signum


def _drain(fd: int) -> None:
    """Empty the non-blocking wake-up pipe."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _bind(part: str, key: str, host: str, port: int, bind: Any) -> Any:
    """Take a port: ``bind()``'s result, or a :class:`StartupError` naming the port."""
    try:
        return bind()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise StartupError(part, f"cannot listen on {host}:{port} ({key}): {why}; fix: stop "
                                 f"what holds the port, or set another {key}") from exc


def _failed_part(exc: BaseException) -> str:
    """Which part a start-up failure came from, by the module that raised it."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        for marker, part in (("/ml/", "model"), ("/db/", "database"), ("/dicom/", "dicom"),
                             ("/housekeeping", "housekeeping"), ("/config", "config"),
                             ("/web/", "http")):
            if marker in path:
                return part
    return "start"


def _stop_within(part: Any, timeout_s: float) -> None:
    """``part.stop()``, with ``timeout_s`` when it takes one."""
    if "timeout_s" in inspect.signature(part.stop).parameters:
        part.stop(timeout_s=timeout_s)
    else:
        part.stop()
