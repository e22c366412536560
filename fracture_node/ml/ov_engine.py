"""The OpenVINO engine: the exported graph (:mod:`fracture_node.ml.ort_engine` describes it)
compiled by OpenVINO for the CPU, without torch.

It runs the same ``<model>.onnx`` as the onnxruntime engine, with the same inputs, outputs and
metadata (OpenVINO keeps the graph's ``metadata_props`` as runtime info under ``framework``),
and combines the test-time views and the maps with the same code
(:class:`fracture_node.ml.ort_engine.GraphRunner`). Precision is pinned to f32: on a CPU with
native bf16 OpenVINO would otherwise compute in bf16, whose logits differ from torch's by about
1 (docs/benchmarks.md), which would move decisions.

This module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fracture_node.errors import ModelError
from fracture_node.ml.ort_engine import (
    INPUT,
    META_CARD,
    META_EVIDENCE_LAYER,
    META_FORMAT,
    META_SHA256,
    META_SOURCE,
    GraphRunner,
)

META_KEYS = (META_FORMAT, META_SHA256, META_SOURCE, META_CARD, META_EVIDENCE_LAYER)


def available() -> bool:
    """True when openvino can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OvRunner(GraphRunner):
    """An exported graph compiled by OpenVINO for the CPU (f32, latency hint).

    Parameters
    ----------
    path:
        The ``.onnx`` file.
    threads:
        Inference threads (0: OpenVINO's default, one per physical core).

    Raises
    ------
    ModelError
        openvino is missing, or the file is not a graph written by ``fracture-node``.
    """

    engine = "openvino"
    compile_config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32",
                                      "PERFORMANCE_HINT": "LATENCY"}
    """What the graph is compiled with (benchmarks/engines.py measures a bf16 variant; serving
    never changes it)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ModelError("the openvino engine needs the openvino package: "
                             "pip install openvino, or set [model] engine = \"onnxruntime\""
                             ) from exc
        self.path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises a bare RuntimeError for every failure
            raise ModelError(f"ONNX graph {self.path.name} cannot be loaded by openvino "
                             f"({type(exc).__name__}); export it again with "
                             "`fracture-node model export`") from exc
        metadata = {key: str(model.get_rt_info(["framework", key]).astype(str))
                    for key in META_KEYS if model.has_rt_info(["framework", key])}
        self._adopt(metadata, tuple(o.get_any_name() for o in model.outputs))
        config = dict(self.compile_config)
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise ModelError(f"ONNX graph {self.path.name} cannot be compiled by openvino "
                             f"({type(exc).__name__}: {exc})") from exc
        self.request = self.compiled.create_infer_request()

    def _infer(self, x: NDArray[np.float32], wanted: list[str]) -> list[NDArray[np.float32]]:
        out = self.request.infer({INPUT: x})
        # The request's output tensors are reused by its next run: copy them.
        return [np.array(out[self.compiled.output(name)], dtype=np.float32) for name in wanted]
