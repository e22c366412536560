"""The composition root: builds every part of a node from its configuration, starts, stops.

Stopping (SIGTERM, SIGINT): stop accepting associations, let in-flight stores finish, let the
worker finish its batch, then exit 0. Whatever was not finished stays in SQL and resumes at the
next start.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from types import FrameType
from typing import Any

from fracture_node import __version__, logs
from fracture_node.config import Config
from fracture_node.db import migrate
from fracture_node.db.store import Store
from fracture_node.dicom.scp import Receiver, node_name
from fracture_node.launcher import allocator_name
from fracture_node.metrics import Metrics, MetricsServer
from fracture_node.spool import Spool
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
        self._parts: list[Any] = []
        self.worker: Any = None
        self.reporter: Any = None
        self.deliverer: Any = None
        self.scheduler: Any = None
        self.housekeeping: Any = None
        self.notifier = Notifier.from_environ(os.environ)
        self.watchdog: WatchdogThread | None = None
        self.wake = threading.Event()

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
        classifier = None
        if cfg.node.role in ("all", "worker"):
            # Load the model before listening: a node that cannot score must not accept.
            from fracture_node.ml.infer import Classifier

            classifier = Classifier.load(cfg.model.path, cfg.model.device)
        if cfg.node.role in ("all", "receiver"):
            self.receiver = Receiver(cfg, self.store, spool, on_stored=self.wake.set,
                                     metrics=self.metrics)
            self.receiver.start()
            closed = self.store.interrupt_open_associations(self.receiver.node)
            if closed:
                log.warning("associations_interrupted", count=closed)
        node = self.receiver.node if self.receiver else node_name(cfg.node.port)
        from fracture_node.housekeeping import Housekeeping

        self.housekeeping = Housekeeping(cfg, self.store, spool, self.metrics, node)
        self.housekeeping.start()
        self._parts.append(self.housekeeping)  # stopped after the worker (parts stop in reverse)
        if classifier is not None:
            self._start_processing(spool, node, classifier)
        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.metrics, self.health, cfg.metrics.host,
                                                cfg.metrics.port)
            self.metrics_server.start()
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
        """The worker (model), the reporter and the deliverer, driven by APScheduler."""
        from apscheduler.schedulers.background import BackgroundScheduler

        from fracture_node.delivery import Deliverer
        from fracture_node.dicom.report import AlgorithmInfo
        from fracture_node.studies import Reporter
        from fracture_node.worker import Worker

        cfg = self.config
        assert self.store is not None
        if self.store.is_postgres is False:
            # SQLite: this process is the only worker, so any claim left is from a run that
            # stopped; take it back now rather than after claim_timeout_s.
            requeued, failed = self.store.take_back_stale_claims(dt.timedelta(0),
                                                                 cfg.model.max_attempts)
            if requeued or failed:
                log.warning("claims_taken_back", requeued=requeued, failed=failed)
            # Likewise a delivery lease; a restart also retries deliveries in back-off at once
            # (an administrator who fixed the PACS and restarted expects them to go now).
            resumed = self.store.make_deliveries_due()
            if resumed:
                log.warning("deliveries_resumed", count=resumed)
        self.deliverer = Deliverer(cfg, self.store, node, metrics=self.metrics)
        scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self.reporter = Reporter(
            cfg, self.store, spool, node,
            AlgorithmInfo(name=classifier.name, version=classifier.version,
                          sha256=classifier.sha256,
                          threshold=classifier.threshold(cfg.model.operating_point),
                          operating_point=cfg.model.operating_point),
            metrics=self.metrics,
            on_report=lambda: scheduler.modify_job("deliver", next_run_time=_now()))
        self.worker = Worker(cfg, self.store, spool, classifier, node, wake=self.wake,
                             metrics=self.metrics,
                             on_batch=lambda: scheduler.modify_job("report",
                                                                   next_run_time=_now()))
        scheduler.add_job(_guarded(self.reporter.run_once, "report"), "interval",
                          seconds=0.25, id="report")
        scheduler.add_job(_guarded(self.deliverer.run_once, "deliver"), "interval",
                          seconds=1.0, id="deliver")
        self.scheduler = scheduler
        self.worker.start()
        scheduler.start()
        self._parts.append(_SchedulerPart(scheduler))
        self._parts.append(self.worker)

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

    def stop(self) -> None:
        """Stop every part in order; safe to call twice."""
        self.stopping.set()
        self.notifier.stopping("draining")
        log.info("node_stopping")
        if self.receiver is not None:
            self.receiver.stop()
        for part in reversed(self._parts):
            part.stop()
        self._parts.clear()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.watchdog is not None:  # systemd enforces the watchdog while stopping too
            self.watchdog.stop()
            self.watchdog = None
        if self.store is not None:
            self.store.dispose()
        self.metrics.up.set(0)
        log.info("node_stopped")

    def run(self) -> int:
        """Start, wait for SIGTERM or SIGINT, stop; the exit code."""
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            while not self.stopping.wait(1.0):
                pass
        finally:
            self.stop()
        return 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _guarded(fn: Any, job: str) -> Any:
    """A scheduler job that logs its errors instead of losing them in APScheduler's logger."""
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            log.error("job_failed", job=job, error=f"{type(exc).__name__}: {exc}")

    return run


class _SchedulerPart:
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)


__all__ = ["Daemon", "node_name"]
