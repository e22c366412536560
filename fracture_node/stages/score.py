"""The inference worker: claims stored instances from the SQL queue and scores them.

Pipeline: the worker thread claims instances in SQL (``FOR UPDATE SKIP LOCKED`` on PostgreSQL),
hands each to a pool of decode threads (read from the spool, check scope, decode, LUTs, resize),
and forms batches across studies of up to ``max_batch`` instances, waiting at most
``max_wait_ms`` for a batch to fill. While the model runs one batch the threads decode the next.
Results are committed in one transaction per batch; a result is only written for an instance
this worker still holds, so a crash or a taken-back claim never records an instance twice. At
most ``2 * max_batch`` instances are held in memory: whatever waits stays in SQL.

With ``[saliency] enabled`` the batch is scored by
:meth:`~fracture_node.ml.explain.Explainer.explain_batch` (one forward and one backward pass; the
same probabilities as ``predict_batch``, test-time augmentation included) and each result keeps
its heat map and regions in source pixels (``results.saliency``). Saliency never costs a score:
if the explainer fails the batch is scored by ``predict_batch``, and if one image's regions
cannot be made its ``saliency`` stays NULL.

Claims are kept alive by a second thread (the claim keeper): every ``claim_timeout_s / 4`` it
refreshes ``claimed_at`` of the claims this worker holds in memory (a heartbeat, so a slow but
live worker never loses them) and takes back every claim not refreshed for ``claim_timeout_s``
(its worker died: SIGKILL, power loss, a lost host). Every live worker does this, so the
claims of a dead one return to the queue without housekeeping or a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom

from fracture_node.config import Config, ScopeConfig
from fracture_node.db import schema as s
from fracture_node.db.store import ClaimedInstance, ResultRecord, Store
from fracture_node.dicom.pixels import check_scope, read_pixels
from fracture_node.dicom.scope import check_anatomy
from fracture_node.errors import DatabaseError, NotProcessable
from fracture_node.logs import get_logger
from fracture_node.priority import lower_current_thread
from fracture_node.saliency import SaliencyRecord
from fracture_node.spool import Spool
from fracture_node.stages import claims

log = get_logger("worker")


@dataclass
class Decoded:
    claimed: ClaimedInstance
    array: Any  # the model input, (S, S) float32
    decode_ms: float
    source_shape: tuple[int, int] = (0, 0)  # rows, columns of the image before the letterbox


@dataclass
class Failed:
    claimed: ClaimedInstance
    state: str  # not_processed or failed
    reason: str
    detail: str


def decode_instance(spool: Spool, claimed: ClaimedInstance,
                    prepare: Callable[[Any], Any],
                    scope: ScopeConfig | None = None) -> Decoded | Failed:
    """Read one spooled instance and turn it into model input; never raises.

    ``scope`` (default: ``ScopeConfig()``) says what the model was trained on: a radiograph
    outside it is ``not_processed`` (``too_small``, ``out_of_scope_body_part``) and never scored.
    """
    started = time.perf_counter()
    try:
        ds = pydicom.dcmread(spool.path(claimed.spool_path))
        check_scope(ds)
        check_anatomy(ds, scope or ScopeConfig())
        image = read_pixels(ds)
        array = prepare(image)
    except NotProcessable as exc:
        return Failed(claimed, s.NOT_PROCESSED, exc.reason, str(exc))
    except FileNotFoundError:
        return Failed(claimed, s.FAILED, "spool_file_missing",
                      f"spool file {claimed.spool_path} is missing")
    except Exception as exc:  # a decoder bug must not stop the worker
        # Only the type: a library's message can quote element values (patient data).
        return Failed(claimed, s.NOT_PROCESSED, "undecodable",
                      f"unexpected {type(exc).__name__} while decoding")
    return Decoded(claimed, array, (time.perf_counter() - started) * 1000,
                   (int(image.shape[0]), int(image.shape[1])))


class Worker:
    """Scores queued instances with the classifier, batch by batch, in a background thread."""

    def __init__(self, config: Config, store: Store, spool: Spool, classifier: Any,
                 node: str, wake: threading.Event | None = None, metrics: Any | None = None,
                 on_batch: Callable[[], None] | None = None,
                 explainer: Any | None = None) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.classifier = classifier
        self.node = node
        self.wake = wake or threading.Event()
        self.metrics = metrics
        self.on_batch = on_batch or (lambda: None)
        self.operating_point = config.model.operating_point
        self.threshold = float(classifier.threshold(self.operating_point))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(config.model.decode_threads,
                                        thread_name_prefix="decode")
        self._pending: deque[tuple[ClaimedInstance, Future[Decoded | Failed]]] = deque()
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self.keep_interval_s = max(0.5, config.model.claim_timeout_s / 4)
        self.batches = 0
        self.explainer = explainer
        if self.explainer is None and config.saliency.enabled:
            self.explainer = _make_explainer(config, classifier)

    # Life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._thread.start()
        self._keeper = threading.Thread(target=self._keep_claims, name="claim-keeper",
                                        daemon=True)
        self._keeper.start()
        log.info("worker_started", model=self.classifier.name, model_version=self.classifier.version,
                 model_sha256=self.classifier.sha256, device=str(self.classifier.device),
                 engine=getattr(self.classifier, "engine", "torch"),
                 threshold=self.threshold, operating_point=self.operating_point,
                 max_batch=self.config.model.max_batch, max_wait_ms=self.config.model.max_wait_ms,
                 saliency=(f"{self.explainer.method}@{self.explainer.layer}"
                           if self.explainer is not None else "off"))

    def alive(self) -> bool:
        """True while the worker thread runs (the systemd watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the batch in hand, give unstarted claims back to the queue, stop."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._keeper is not None:
            self._keeper.join(timeout_s)
        self._pool.shutdown(wait=True, cancel_futures=True)
        left = [c.id for c, _ in self._pending]
        self._pending.clear()
        self._let_go(left)
        if left:
            try:
                self.store.release_claims(self.node, left)
            except DatabaseError as exc:
                log.error("claims_not_released", count=len(left), error=str(exc))
        log.info("worker_stopped", released=len(left), batches=self.batches)

    # Claims -------------------------------------------------------------------------------
    def held(self) -> list[int]:
        """The instance ids this worker has claimed and not finished (in memory)."""
        with self._held_lock:
            return sorted(self._held)

    def _let_go(self, ids: list[int]) -> None:
        with self._held_lock:
            self._held.difference_update(ids)

    def keep_claims(self) -> tuple[int, int, int]:
        """One heartbeat: refresh this worker's claims, then take back the claims of dead
        workers. Returns (renewed, requeued, failed)."""
        renewed = self.store.renew_claims(self.node, self.held())
        requeued, failed = claims.take_back(self.store, self.config.model, "keeper")
        if requeued or failed:
            self.wake.set()
        return renewed, requeued, failed

    def _keep_claims(self) -> None:
        while not self._stop.wait(self.keep_interval_s):
            try:
                self.keep_claims()
            except DatabaseError as exc:
                log.error("claims_not_kept", error=str(exc))
            except Exception as exc:  # the keeper must outlive any surprise
                log.exception("claim_keeper_error", error=f"{type(exc).__name__}: {exc}")

    # The loop -----------------------------------------------------------------------------
    def _refill(self, batch_open: bool = False) -> int:
        """Claim and start decoding up to two batches' worth; ``batch_open``: a batch is being
        formed (so a retry, which must be alone, is not claimed now)."""
        room = 2 * self.config.model.max_batch - len(self._pending)
        if room <= 0 or any(c.is_retry for c, _ in self._pending):
            return 0  # a retry is decoded and scored with nothing else in hand
        claimed = self.store.claim_instances(
            self.node, room, retry_alone=not (self._pending or batch_open))
        for item in claimed:
            if item.is_retry:
                log.warning("retry_claimed_alone", instance_id=item.id,
                            sop_instance_uid=item.sop_instance_uid, attempt=item.attempts,
                            max_attempts=self.config.model.max_attempts)
        with self._held_lock:
            self._held.update(item.id for item in claimed)
        for item in claimed:
            future = self._pool.submit(decode_instance, self.spool, item, self.classifier.prepare,
                                       self.config.scope)
            self._pending.append((item, future))
        return len(claimed)

    def _run(self) -> None:
        lower_current_thread(self.config.model.nice)  # its decode threads inherit it
        while not self._stop.is_set():
            try:
                if not self.run_once():
                    self.wake.wait(1.0)
                    self.wake.clear()
            except DatabaseError as exc:
                log.error("worker_database_error", error=str(exc))
                self._stop.wait(2.0)
            except Exception as exc:  # keep the worker alive; the claim timeout recovers
                log.exception("worker_error", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(2.0)

    def run_once(self) -> int:
        """Form and score one batch; returns the number of instances finished (0: idle)."""
        self._refill()
        if not self._pending:
            return 0
        batch: list[Decoded] = []
        try:
            return self._form_and_score(batch)
        except BaseException:
            # Whatever was taken out of _pending is no longer in hand: stop renewing its claims,
            # so that they lapse and are scored again after claim_timeout_s.
            self._let_go([d.claimed.id for d in batch])
            raise

    def _form_and_score(self, batch: list[Decoded]) -> int:
        max_batch = self.config.model.max_batch
        max_wait = self.config.model.max_wait_ms / 1000
        finished = 0
        deadline: float | None = None
        while len(batch) < max_batch and not self._stop.is_set():
            if not self._pending:
                remaining = (deadline or 0) - time.monotonic()
                if deadline is None or remaining <= 0 or self._refill(batch_open=bool(batch)):
                    if not self._pending:
                        break
                    continue
                self.wake.wait(remaining)
                self.wake.clear()
                if not self._refill(batch_open=bool(batch)):
                    break
                continue
            claimed, future = self._pending[0]
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                outcome = future.result(timeout=timeout)
            except FutureTimeout:
                break
            self._pending.popleft()
            if isinstance(outcome, Failed):
                self._finish_failed(outcome)
                finished += 1
                continue
            batch.append(outcome)
            if claimed.is_retry:
                break  # alone in its batch: see Store.claim_instances
            if deadline is None:
                deadline = time.monotonic() + max_wait
        if batch:
            finished += self._score(batch)
        return finished

    def _finish_failed(self, failed: Failed) -> None:
        try:
            self.store.finish_unprocessed(self.node, failed.claimed.id, failed.state,
                                          failed.reason, failed.detail[:2000])
        finally:
            self._let_go([failed.claimed.id])
        if self.metrics:
            self.metrics.not_processed.labels(failed.reason).inc()
        log.info("instance_not_processed", instance_id=failed.claimed.id,
                 sop_instance_uid=failed.claimed.sop_instance_uid, state=failed.state,
                 reason=failed.reason)
        self.on_batch()

    def _infer(self, stacked: Any) -> tuple[Any, Any | None]:
        """Probabilities and, with saliency on, the heat maps (None when the explainer fails)."""
        if self.explainer is not None:
            try:
                return self.explainer.explain_batch(stacked)
            except Exception as exc:  # saliency must never cost a score
                # Only the type: the message of a library error is not ours to vouch for.
                log.error("saliency_failed", size=len(stacked), error=type(exc).__name__,
                          detail="scored without saliency; results.saliency stays NULL")
        return self.classifier.predict_batch(stacked), None

    def _saliency(self, decoded: Decoded, heatmap: Any) -> str | None:
        cfg = self.config.saliency
        explainer: Any = self.explainer
        try:
            return SaliencyRecord.from_map(
                heatmap, decoded.source_shape, method=explainer.method,
                layer=explainer.layer, threshold=cfg.threshold,
                max_regions=cfg.max_regions).to_json()
        except Exception as exc:  # one image's regions must never cost its score
            log.error("saliency_regions_failed", instance_id=decoded.claimed.id,
                      sop_instance_uid=decoded.claimed.sop_instance_uid,
                      error=type(exc).__name__)
            return None

    def _score(self, batch: list[Decoded]) -> int:
        try:
            started = time.perf_counter()
            probabilities, heatmaps = self._infer(np.stack([d.array for d in batch]))
            infer_ms = (time.perf_counter() - started) * 1000
            c = self.classifier
            saliency: list[str | None] = (
                [self._saliency(d, h) for d, h in zip(batch, heatmaps, strict=True)]
                if heatmaps is not None else [None] * len(batch))
            records = [
                ResultRecord(instance_id=d.claimed.id, probability=float(p),
                             positive=bool(p >= self.threshold), threshold=self.threshold,
                             operating_point=self.operating_point, model_name=c.name,
                             model_version=c.version, model_sha256=c.sha256,
                             decode_ms=round(d.decode_ms, 2), infer_ms=round(infer_ms, 2),
                             batch_size=len(batch), saliency=sal)
                for d, p, sal in zip(batch, probabilities, saliency, strict=True)
            ]
            saved = self.store.save_results(self.node, records)
        finally:
            # Saved, or lost with a failed model call or transaction: either way no longer
            # ours to keep alive (an unsaved claim lapses after claim_timeout_s and is scored
            # again).
            self._let_go([d.claimed.id for d in batch])
        self.batches += 1
        if self.metrics:
            self.metrics.processed.inc(saved)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.inference_seconds.observe(infer_ms / 1000)
            for d in batch:
                self.metrics.decode_seconds.observe(d.decode_ms / 1000)
        log.info("batch_scored", size=len(batch), saved=saved, infer_ms=round(infer_ms, 1),
                 positives=sum(r.positive for r in records),
                 with_saliency=sum(r.saliency is not None for r in records))
        if saved < len(batch):
            log.warning("results_skipped", count=len(batch) - saved,
                        detail="claims were taken back before the results were saved")
        self.on_batch()
        return len(batch)


def _make_explainer(config: Config, classifier: Any) -> Any | None:
    """The Explainer of ``[saliency]``, or None (logged) when the model cannot be explained."""
    from fracture_node.ml.explain import Explainer

    try:
        return Explainer(classifier, method=config.saliency.method, layer=config.saliency.layer)
    except Exception as exc:  # an unexplainable model still scores
        log.error("saliency_unavailable", method=config.saliency.method,
                  layer=config.saliency.layer, error=f"{type(exc).__name__}: {exc}",
                  detail="results are scored without saliency")
        return None
