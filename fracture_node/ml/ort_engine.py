"""The ONNX Runtime engine: an exported model file run on the CPU, without torch.

The graph is written by :func:`fracture_node.ml.onnx_export.export_onnx` from a model file
(``<model>.onnx`` beside ``<model>.pt``). It takes the letterboxed grey images as they leave
:func:`fracture_node.images.letterbox` (input ``image``, ``[N, 1, S, S]`` float32 in [0, 1]; the
card's normalisation is inside the graph) and returns

``logit``     ``[N]``: the network's logit (before the card's calibration);
``evidence``  ``[N, h, w]`` (architectures whose head is global-average pooling then one linear
              layer: ResNet, DenseNet, EfficientNet-Lite): the classifier's weights applied at
              every cell of the last stage, ``sum_c w_c A_c``, so that
              ``logit = mean(evidence) + bias``. For such a head the gradient of the logit with
              respect to ``A`` is ``w / (h w)`` everywhere, so this map is the HiResCAM (and
              Grad-CAM) map of :mod:`fracture_node.ml.explain` at ``layer = "last"`` up to that
              constant factor: saliency costs no backward pass and no second run.

The graph's ``metadata_props`` carry the sha256 of the model file it was exported from
(:data:`META_SHA256`) and the model's card (:data:`META_CARD`, JSON). The model file stays the
single source of truth: a graph whose recorded sha256 is not that of the model file is never run
(:func:`check_source`).

:class:`GraphRunner` is what every engine of this graph shares (metadata, card, the test-time
views and maps combined); :class:`OrtRunner` runs it on ONNX Runtime and
:class:`fracture_node.ml.ov_engine.OvRunner` on OpenVINO.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fracture_node.errors import ModelError

FORMAT = "fracture-node-onnx/1"
META_FORMAT = "fracture_node_format"
META_SHA256 = "source_sha256"
META_SOURCE = "source_name"
META_CARD = "card"
META_EVIDENCE_LAYER = "evidence_layer"
INPUT = "image"
LOGIT = "logit"
EVIDENCE = "evidence"
GRAPH_ENGINES: tuple[str, ...] = ("openvino", "onnxruntime")
"""The engines that run the exported graph, in ``auto``'s order of preference on a CPU (OpenVINO
first: the faster on the measured machines, docs/benchmarks.md)."""
EVIDENCE_METHODS: tuple[str, ...] = ("hirescam", "gradcam")
"""Saliency methods that the ``evidence`` output gives exactly at ``layer = "last"`` (for a
global-average-pooling + linear head both equal the class activation map)."""


def has_evidence_map(arch: str) -> bool:
    """Architectures whose head is global-average pooling then one linear layer (ResNet,
    DenseNet, EfficientNet-Lite, and ensembles of EfficientNet-Lite, whose names join the
    members' with ``+``): their graph carries the class-evidence map."""
    return all(m.startswith(("resnet", "densenet", "efficientnet_lite")) for m in arch.split("+"))


def onnx_path_for(model_path: Path) -> Path:
    """Where the exported graph of a model file lives: beside it, suffix ``.onnx``."""
    return Path(model_path).with_suffix(".onnx")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (a model file's identity), without torch.

    Raises
    ------
    ModelError
        The file does not exist or cannot be read.
    """
    h = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read: {exc.strerror}") from exc
    return h.hexdigest()


def available() -> bool:
    """True when onnxruntime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class GraphRunner:
    """What every engine of the exported graph shares: the graph's metadata checked and read,
    its card, and :meth:`run` (the test-time views and the maps combined). A subclass opens the
    graph (:attr:`engine` names it), then calls :meth:`_adopt` with the graph's metadata and
    output names, and runs the graph in :meth:`_infer`."""

    engine = ""
    path: Path
    metadata: dict[str, str]
    outputs: tuple[str, ...]
    has_evidence: bool
    source_sha256: str
    evidence_layer: str

    def _adopt(self, metadata: dict[str, str], outputs: tuple[str, ...]) -> None:
        """Keep the graph's metadata and outputs; refuse a graph not written by fracture-node.

        Raises
        ------
        ModelError
            The graph's recorded format is not :data:`FORMAT`.
        """
        if metadata.get(META_FORMAT) != FORMAT:
            raise ModelError(f"ONNX graph {self.path.name} was not written by fracture-node "
                             f"(format {metadata.get(META_FORMAT)!r}, expected {FORMAT!r})")
        self.metadata = metadata
        self.outputs = outputs
        self.has_evidence = EVIDENCE in outputs
        self.source_sha256 = metadata.get(META_SHA256, "")
        self.evidence_layer = metadata.get(META_EVIDENCE_LAYER, "")

    def card(self) -> dict[str, Any]:
        """The card of the model file the graph was exported from."""
        try:
            card = json.loads(self.metadata[META_CARD])
        except (KeyError, ValueError) as exc:
            raise ModelError(f"ONNX graph {self.path.name} carries no readable card") from exc
        if not isinstance(card, dict):
            raise ModelError(f"ONNX graph {self.path.name} carries no readable card")
        return card

    def _infer(self, x: NDArray[np.float32], wanted: list[str]) -> list[NDArray[np.float32]]:
        """The graph's outputs named ``wanted`` for input ``x`` (arrays the caller may keep)."""
        raise NotImplementedError

    def run(self, images: NDArray[np.float32], tta: bool, evidence: bool
            ) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        """Logits ``[N]`` and, with ``evidence``, class activation maps ``[N, h, w]``.

        With ``tta`` the horizontally flipped images run in the same call; the logits are the
        mean of both views and the maps the sum of both views' positive parts (the flipped
        view's map flipped back), as :class:`fracture_node.ml.explain.Explainer` does.
        """
        n = images.shape[0]
        x = np.ascontiguousarray(images, dtype=np.float32)[:, None]
        if tta:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])
        wanted = [LOGIT, EVIDENCE] if evidence else [LOGIT]
        if evidence and not self.has_evidence:
            raise ModelError(f"ONNX graph {self.path.name} has no evidence output "
                             "(its architecture's head is not pooling + linear)")
        out = self._infer(x, wanted)
        logits: NDArray[np.float32] = np.asarray(out[0], dtype=np.float32).reshape(-1)
        if tta:
            logits = ((logits[:n] + logits[n:]) / np.float32(2)).astype(np.float32)
        if not evidence:
            return logits, None
        ev = np.maximum(np.asarray(out[1], dtype=np.float32), 0.0)
        cams = ev[:n] + ev[n:, :, ::-1] if tta else ev
        return logits, np.ascontiguousarray(cams)


class OrtRunner(GraphRunner):
    """An exported graph in an ONNX Runtime session on the CPU.

    Parameters
    ----------
    path:
        The ``.onnx`` file.
    threads:
        Intra-op threads (0: ONNX Runtime's default, one per physical core).

    Raises
    ------
    ModelError
        onnxruntime is missing, or the file is not a graph written by ``fracture-node``.
    """

    engine = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("the onnxruntime engine needs the onnxruntime package: "
                             "pip install onnxruntime, or set [model] engine = \"torch\"") from exc
        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(0, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: the decode threads need the cores meanwhile.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unexported exception classes
            raise ModelError(f"ONNX graph {self.path.name} cannot be loaded by onnxruntime "
                             f"({type(exc).__name__}); export it again with "
                             "`fracture-node model export`") from exc
        self._adopt(dict(self.session.get_modelmeta().custom_metadata_map),
                    tuple(o.name for o in self.session.get_outputs()))

    def _infer(self, x: NDArray[np.float32], wanted: list[str]) -> list[NDArray[np.float32]]:
        return list(self.session.run(wanted, {INPUT: x}))


def check_source(runner: GraphRunner, model_sha256: str) -> None:
    """Refuse a graph that was not exported from the model file with this sha256 (any engine).

    Raises
    ------
    ModelError
        The recorded sha256 differs (the message names both).
    """
    if runner.source_sha256 != model_sha256:
        raise ModelError(
            f"ONNX graph {runner.path.name} was exported from a model file with sha256 "
            f"{runner.source_sha256 or 'unrecorded'}, not from this one ({model_sha256}); "
            "export it again with `fracture-node model export`")


# Bicubic upsampling without torch ------------------------------------------------------------

_CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic coefficient


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    a = _CUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def cubic_matrix(n_in: int, n_out: int) -> NDArray[np.float64]:
    """``[n_out, n_in]``: the 1-D bicubic resampling of ``torch.nn.functional.interpolate``
    (``mode="bicubic"``, ``align_corners=False``; indices clamped at the border)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        for k, w in enumerate(_cubic_weights(src - i0)):
            m[i, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return m


def upsample_cams(cams: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """Maps ``[N, h, w]`` brought to ``[N, size, size]`` bicubically, clipped at 0 and divided by
    each map's maximum (all zero where a map has no positive value): the same maps as
    :func:`fracture_node.ml.explain.upsample` followed by the explainer's normalisation."""
    _, h, w = cams.shape
    rows = cubic_matrix(h, size).astype(np.float32)
    cols = cubic_matrix(w, size).astype(np.float32)
    up = np.maximum(rows @ cams.astype(np.float32) @ cols.T, 0.0)
    peak = up.max(axis=(1, 2), keepdims=True)
    safe = np.where(peak > 0, peak, 1.0)
    return np.where(peak > 0, up / safe, 0.0).astype(np.float32)
