"""ONNX export: the graph that :mod:`fracture_node.ml.ort_engine` runs, derived from a model file.

:func:`export_onnx` builds the network of a model file, wraps it with the card's input
normalisation and, for a global-average-pooling + linear head, the class-evidence map as a
second output (see :mod:`fracture_node.ml.ort_engine` for the graph's contract), exports it with
``torch.onnx.export`` (batch size dynamic, input size fixed), records the model file's sha256
and card in the graph's ``metadata_props``, runs it once against torch on a probe batch and
writes it atomically (``<model>.onnx`` beside the model file unless told otherwise).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fracture_node import __version__
from fracture_node.errors import ModelError
from fracture_node.logs import get_logger
from fracture_node.ml import ort_engine as oe
from fracture_node.ml.model import ModelFile, load_model_file, pools_features

log = get_logger("ml.onnx_export")

OPSET = 17
PARITY_TOLERANCE = 1e-4
"""Largest difference between the graph's logits and torch's on the probe batch, relative to
``max(1, |logit|)``; larger refuses the export."""


def _last_stage(net: nn.Module, arch: str, x: torch.Tensor
                ) -> tuple[torch.Tensor, nn.Linear, str]:
    """The last stage's activations ``[N, C, h, w]`` (what the pooling averages), the linear
    head, and the name of the module whose output they are (the explainer's ``last`` layer)."""
    m: Any = net
    if pools_features(arch):  # EfficientNet-Lite, and their ensembles (members' bn2 side by side)
        return m.forward_features(x), m.classifier, "bn2"
    if arch.startswith("resnet"):
        f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        return f, m.fc, "layer4"
    if arch.startswith("densenet"):
        return F.relu(m.features(x)), m.classifier, "features"
    raise ModelError(f"no class-evidence map for architecture {arch}")


class ExportGraph(nn.Module):
    """Normalisation, the network, and (where the head allows) the class-evidence map.

    ``forward(image [N, 1, S, S] in [0, 1])`` returns ``logit [N]``, or ``(logit, evidence)``
    with ``evidence [N, h, w] = sum_c w_c A_c`` and ``logit = mean(evidence) + bias``.
    """

    def __init__(self, net: nn.Module, arch: str, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.mean = float(mean)
        self.std = float(std) or 1.0
        self.evidence = oe.has_evidence_map(arch)

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.mean) / self.std
        if not self.evidence:
            return self.net(x).squeeze(1)
        features, head, _ = _last_stage(self.net, self.arch, x)
        evidence = F.conv2d(features, head.weight[:, :, None, None]).squeeze(1)
        assert head.bias is not None
        return evidence.mean(dim=(1, 2)) + head.bias[0], evidence


def _normalisation(card: dict[str, Any]) -> tuple[float, float]:
    norm = card.get("normalisation") or {}
    return float(norm.get("mean", 0.0)), float(norm.get("std", 1.0)) or 1.0


def export_onnx(model: ModelFile | Path | str, out: Path | str | None = None, *,
                verify: bool = True) -> Path:
    """Export a model file's network to ONNX and return the path written.

    Parameters
    ----------
    model:
        A loaded model file, or its path.
    out:
        Where to write (default: :func:`~fracture_node.ml.ort_engine.onnx_path_for`, beside the
        model file). Written atomically: a reader never sees half a graph.
    verify:
        Run the graph in onnxruntime on a probe batch and refuse it when its logits differ
        from torch's by more than :data:`PARITY_TOLERANCE`.

    Raises
    ------
    ModelError
        The model file is unreadable, the export fails, the graph disagrees with torch, or the
        target cannot be written.
    """
    mf = model if isinstance(model, ModelFile) else load_model_file(model)
    target = Path(out) if out is not None else oe.onnx_path_for(mf.path)
    card = mf.card
    arch = str(card["architecture"])
    size = int(card["input_size"])
    mean, std = _normalisation(card)
    graph = ExportGraph(mf.build().float(), arch, mean, std).eval()
    probe = _probe(size)
    outputs = [oe.LOGIT, oe.EVIDENCE] if graph.evidence else [oe.LOGIT]
    dynamic = {oe.INPUT: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    evidence_layer = ""
    if graph.evidence:
        with torch.no_grad():
            _, _, evidence_layer = _last_stage(graph.net, arch, torch.zeros(1, 1, 64, 64))
    metadata = {
        oe.META_FORMAT: oe.FORMAT,
        oe.META_SHA256: mf.sha256,
        oe.META_SOURCE: mf.path.name,
        oe.META_CARD: json.dumps(card, sort_keys=True),
        oe.META_EVIDENCE_LAYER: evidence_layer,
        "architecture": arch,
        "input_size": str(size),
        "exported_by": f"fracture-node {__version__}, torch {torch.__version__}",
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the folder of {target}: {exc.strerror}") from exc
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _export(graph, probe, tmp, outputs, dynamic, metadata)
        if verify:
            _verify(graph, probe, tmp, mf.sha256)
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelError(f"cannot write the ONNX graph {target}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("onnx_exported", model=str(card["name"]), model_sha256=mf.sha256,
             path=str(target), outputs=",".join(outputs), input_size=size, verified=verify)
    return target


def _probe(size: int) -> torch.Tensor:
    """Two deterministic probe images in [0, 1]: a smooth ramp with a bright bar, and noise."""
    gen = torch.Generator().manual_seed(25)
    ramp = torch.linspace(0, 1, size)[None, :].expand(size, size).clone()
    ramp[size // 3 : size // 2, size // 4 : 3 * size // 4] = 0.9
    noise = torch.rand(size, size, generator=gen)
    return torch.stack([ramp, noise])[:, None].float()


def _export(graph: ExportGraph, probe: torch.Tensor, path: Path, outputs: list[str],
            dynamic: dict[str, dict[int, str]], metadata: dict[str, str]) -> None:
    import onnx

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(graph, (probe,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[oe.INPUT], output_names=outputs,
                              dynamic_axes=dynamic, do_constant_folding=True)
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    except OSError:
        raise
    except Exception as exc:
        raise ModelError(f"ONNX export of {graph.arch} failed: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                         ) from exc


def _verify(graph: ExportGraph, probe: torch.Tensor, path: Path, sha256: str) -> None:
    runner = oe.OrtRunner(path, threads=0)
    oe.check_source(runner, sha256)
    with torch.no_grad():  # the network's own forward, not the wrapper's reformulation
        ref = graph.net((probe - graph.mean) / graph.std).squeeze(1).numpy()
    got, _ = runner.run(probe[:, 0].numpy(), tta=False, evidence=False)
    diff = float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))
    if not diff <= PARITY_TOLERANCE:
        raise ModelError(f"the exported graph's logits differ from torch's by {diff:.2e} "
                         f"(tolerance {PARITY_TOLERANCE:.0e}); not written")
