"""The scoring threads run nicer than the receiver (fracture_node/priority.py): the worker
thread, the threads it starts and an engine pool created in :func:`call_niced`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fracture_node.priority import call_niced, lower_current_thread, thread_nice

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="POSIX only")


def _nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _small_model(folder: Path) -> Path:
    """A small resnet18 model file (64 px) with a fixed seed."""
    import torch

    from fracture_node.ml.model import build_model, save_model_file

    torch.manual_seed(0)
    model = folder / "m.pt"
    save_model_file(model, build_model("resnet18"), {
        "name": "nice-test", "version": "0", "architecture": "resnet18", "input_size": 64,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.4, "std": 0.2}, "tta": False})
    return model


def test_call_niced_runs_at_the_niceness_and_leaves_the_caller_alone() -> None:
    before = thread_nice()
    assert before is not None and before < 7
    seen = call_niced(thread_nice, 7)
    assert seen == 7
    assert thread_nice() == before


def test_threads_started_inside_inherit_the_niceness() -> None:
    def start_one() -> int | None:
        box: list[int | None] = []
        t = threading.Thread(target=lambda: box.append(thread_nice()))
        t.start()
        t.join()
        return box[0]

    assert call_niced(start_one, 9) == 9


def test_call_niced_passes_exceptions_through() -> None:
    def boom() -> None:
        raise ValueError("no model")

    with pytest.raises(ValueError, match="no model"):
        call_niced(boom, 5)


def test_zero_changes_nothing() -> None:
    before = thread_nice()
    assert call_niced(thread_nice, 0) == before


def test_lower_current_thread_never_raises_priority() -> None:
    box: list[int | None] = []

    def run() -> None:
        lower_current_thread(12)
        lower_current_thread(4)  # already nicer: unchanged
        box.append(thread_nice())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert box == [max(12, thread_nice() or 0)]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_graph_engines_pool_made_in_call_niced_is_niced(tmp_path: Path, engine: str) -> None:
    """The engine's intra-op threads, created with its session (or compiled model), inherit the
    load thread's niceness: none of the threads the engine started runs at the caller's
    priority."""
    from fracture_node.ml.infer import open_graph
    from fracture_node.ml.onnx_export import export_onnx

    graph = export_onnx(_small_model(tmp_path))
    before = _tids()
    runner = call_niced(lambda: open_graph(engine, graph, threads=2), 11)
    runner.run(np.zeros((2, 64, 64), dtype=np.float32), tta=False, evidence=False)
    new = _tids() - before
    alive = {t for t in new if Path(f"/proc/self/task/{t}").exists()}
    assert alive, f"{engine} started no thread of its own"
    assert all(_nice_of(t) == 11 for t in alive), {t: _nice_of(t) for t in alive}


def test_a_running_node_scores_nicer_than_it_receives(tmp_path: Path) -> None:
    """In a started node (receiver + worker): the worker thread and the engine's threads run at
    `[model] nice`; the receiver's server thread and the main thread keep their priority."""
    import dataclasses

    from fracture_node.daemon import Daemon
    from fracture_node.ml.onnx_export import export_onnx
    from tests.support.node import node_config

    model = _small_model(tmp_path)
    export_onnx(model)
    base = node_config(tmp_path, f"sqlite:///{tmp_path / 'fn.db'}")
    config = dataclasses.replace(
        base, model=dataclasses.replace(base.model, path=model, device="cpu", nice=8),
        metrics=dataclasses.replace(base.metrics, enabled=False)).validate()
    main_nice = thread_nice()
    before = _tids()
    daemon = Daemon(config)
    try:
        daemon.start()
        threads = {t.name: t.native_id for t in threading.enumerate() if t.native_id is not None}
        assert threads.get("worker") is not None
        assert _nice_of(threads["worker"]) == 8
        scoring = ("worker", "claim-keeper", "decode", "model-load")
        others = [name for name in threads if not name.startswith(scoring)
                  and threads[name] in _tids() - {threading.get_native_id()}]
        assert others, threads
        started = {t for t in _tids() - before
                   if t not in threads.values() and Path(f"/proc/self/task/{t}").exists()}
        assert started, "the engine started no thread of its own"
        assert all(_nice_of(t) == 8 for t in started), {t: _nice_of(t) for t in started}
        assert all(_nice_of(threads[n]) == main_nice for n in others
                   if threads[n] in _tids() - before), {n: _nice_of(threads[n]) for n in others}
        assert thread_nice() == main_nice
    finally:
        daemon.stop(timeout_s=10)
