"""Explain: where the fracture model looked, as class-activation heat maps and source regions.

:class:`Explainer` wraps a loaded :class:`~fracture_node.ml.infer.Classifier` and returns, for a
prepared batch (the same ``[N, S, S]`` array ``predict_batch`` takes), the probabilities and one
heat map per image in model-input coordinates, ``[N, S, S]`` float32 in [0, 1] (each map divided
by its own maximum; an all-zero map means no positive evidence). Methods, on the activations
``A`` of the target layer and the gradients ``G`` of the fracture logit with respect to them:

``gradcam``    Grad-CAM (Selvaraju et al. 2017): ``relu(sum_c mean(G_c) A_c)``.
``gradcampp``  Grad-CAM++ (Chattopadhay et al. 2018): channel weights from positive gradients,
               weighted by the closed-form alphas (exponential of the logit as the score).
``hirescam``   HiResCAM (Draelos & Carin 2020): ``relu(sum_c G_c * A_c)``, element-wise.
``layercam``   LayerCAM (Jiang et al. 2021): ``relu(sum_c relu(G_c) * A_c)``, element-wise.

The cost is one extra backward pass per batch, and only through the layers after the target
layer: the backbone up to the target layer runs without recording a graph, its output is cut
from it and made a leaf that requires grad, and ``torch.autograd.grad`` differentiates the head
alone. No parameter gradient is computed or stored.

Target layers, per family: ``layer="last"`` is the last convolutional stage (stride 32):
``layer4`` (ResNet), ``features`` (DenseNet, before the final ReLU), ``features[-1]``
(EfficientNet, MobileNetV3, ConvNeXt), ``bn2`` (EfficientNet-Lite: the 1x1 head convolution
after its BatchNorm and ReLU6, the features the classifier pools). ``layer="stride16"`` (the default) takes the last stage at
stride 16 instead (``layer3``, ``features.denseblock3``, ...: a map twice as fine, for a backward
pass through the last stage); ``layer="fused"`` takes both from the same backward pass and returns the
geometric mean of their normalised maps (coarse class evidence, finer position).

torch is imported by the functions that need it. The geometry that turns these maps into
source-image maps and regions is torch-free: :mod:`fracture_node.saliency.geometry`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fracture_node.errors import ModelError
from fracture_node.logs import get_logger

# The choices and defaults live in a torch-free leaf, so that config checks them without ml.
from fracture_node.saliency.defaults import DEFAULT_LAYER as DEFAULT_LAYER
from fracture_node.saliency.defaults import DEFAULT_MAX_REGIONS as DEFAULT_MAX_REGIONS
from fracture_node.saliency.defaults import DEFAULT_METHOD as DEFAULT_METHOD
from fracture_node.saliency.defaults import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from fracture_node.saliency.defaults import LAYERS as LAYERS
from fracture_node.saliency.defaults import METHODS as METHODS

if TYPE_CHECKING:
    import torch
    from torch import nn

log = get_logger("ml.explain")

HeatMaps = NDArray[np.float32]


# Target layers ------------------------------------------------------------------------------


def _stages(net: nn.Module, architecture: str) -> list[tuple[str, nn.Module]]:
    """The network's feature stages in forward order, each with its dotted name."""
    from torch import nn
    if architecture.startswith("resnet"):
        return [(n, getattr(net, n)) for n in ("layer1", "layer2", "layer3", "layer4")]
    if architecture.startswith("efficientnet_lite"):  # timm: blocks, then the 1x1 head conv
        blocks = getattr(net, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise ModelError(f"architecture {architecture!r}: no `blocks` stages to explain")
        head: nn.Module = net.get_submodule("bn2")
        return [(f"blocks.{n}", m) for n, m in blocks.named_children()] + [("bn2", head)]
    features = getattr(net, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ModelError(f"architecture {architecture!r}: no `features` stages to explain")
    return [(f"features.{n}", m) for n, m in features.named_children()]


def target_layer(net: nn.Module, architecture: str, layer: str = "last"
                 ) -> tuple[str, nn.Module]:
    """The module whose output is explained: the last feature stage, or the last at stride 16.

    Parameters
    ----------
    net:
        A network built by :func:`fracture_node.ml.model.build_model`.
    architecture:
        Its name (``resnet18``, ``densenet121``, ``efficientnet_b0``, ``mobilenet_v3_small``,
        ``convnext_tiny``, ...).
    layer:
        ``last`` (stride 32, the usual Grad-CAM layer) or ``stride16``.

    Returns
    -------
    (name, module)
    """
    from torch import nn

    if layer not in ("last", "stride16"):
        raise ModelError(f"unknown saliency layer {layer!r}; choose one of {', '.join(LAYERS)}")
    if "+" in architecture:  # an ensemble (fracture_node.ml.model.Ensemble)
        if layer != "last":
            raise ModelError(f"ensemble {architecture!r} is explained at layer last (its "
                             f"members' last stages side by side), not {layer}")
        return "bn2", net.get_submodule("bn2")
    if architecture.startswith("densenet") and layer == "last":
        features = getattr(net, "features", None)
        if not isinstance(features, nn.Module):
            raise ModelError(f"architecture {architecture!r}: no `features` to explain")
        return "features", features
    stages = _stages(net, architecture)
    if layer == "last":
        return stages[-1]
    sizes = _stage_sizes(net, stages)
    final = sizes[-1]
    for (name, module), size in zip(reversed(stages), reversed(sizes), strict=True):
        if size >= 2 * final:
            return name, module
    raise ModelError(f"architecture {architecture!r}: no feature stage at stride 16")


def _stage_sizes(net: nn.Module, stages: Sequence[tuple[str, nn.Module]]) -> list[int]:
    """Output height of every stage on a 64 x 64 probe (stride 16 gives 4, stride 32 gives 2)."""
    import torch

    sizes: dict[int, int] = {}
    handles = [m.register_forward_hook(
        lambda _m, _i, out, k=k: sizes.__setitem__(k, int(out.shape[-2])))
        for k, (_, m) in enumerate(stages)]
    param = next(net.parameters())
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, 64, 64, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return [sizes[k] for k in range(len(stages))]


# Class activation maps ----------------------------------------------------------------------


def cams(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """A class activation map ``[N, h, w]`` (>= 0, not normalised) from ``A`` and ``dlogit/dA``.

    Parameters
    ----------
    activations, gradients:
        ``[N, C, h, w]``, float32.
    method:
        One of :data:`METHODS`.
    """
    import torch
    import torch.nn.functional as F

    a, g = activations, gradients
    if method == "gradcam":
        weights = g.mean(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(dim=1)
    elif method == "hirescam":
        cam = (g * a).sum(dim=1)
    elif method == "layercam":
        cam = (F.relu(g) * a).sum(dim=1)
    elif method == "gradcampp":
        # Chattopadhay et al. 2018, eq. 19 with S = exp(logit): the higher derivatives of the
        # exponential reduce to powers of the first one.
        g2, g3 = g.pow(2), g.pow(3)
        denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(g != 0, g2 / torch.where(denominator != 0, denominator,
                                                     torch.ones_like(denominator)),
                            torch.zeros_like(g))
        weights = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(dim=1)
    else:
        raise ModelError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    return F.relu(cam)


UPSAMPLING = "bicubic"
"""How a map grid (16 x 16 at 512 px) is brought to the input size. Bicubic, not bilinear: a
bilinear map peaks exactly at a cell centre, 32 px apart at stride 32, while a bicubic one peaks
between two hot cells, nearer the evidence. On the val split (87 boxed images) the pointing game of
the bundled model went from 0.276 to 0.379 (13 images gained, 4 lost), on its 408 boxed train
images from 0.480 to 0.583 (docs/model-card-saliency.md). Cells are placed as in training's box
loss (cell ``i`` covers input pixels ``[i s, (i + 1) s)``, ``align_corners=False``)."""


def upsample(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Map grids ``[N, h, w]`` brought to ``[N, size, size]`` (:data:`UPSAMPLING`); not clipped.

    The one placement of cells on the input, shared by the daemon's maps and ``train``'s
    per-epoch pointing game.
    """
    import torch.nn.functional as F

    return F.interpolate(grid[:, None], size=(size, size), mode=UPSAMPLING,
                         align_corners=False)[:, 0]


def _upsample_normalised(cam: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling to ``size`` x ``size``, clipped at 0, divided by each map's maximum."""
    import torch
    import torch.nn.functional as F

    up = F.relu(upsample(cam, size))  # bicubic overshoots below 0 next to a steep edge
    peak = up.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, up / torch.where(peak > 0, peak, torch.ones_like(peak)),
                       torch.zeros_like(up))


@contextmanager
def _graph_from(modules: Sequence[nn.Module], slots: list[torch.Tensor | None]
                ) -> Iterator[None]:
    """Run the network without a graph until ``modules[0]``; record one from its output on.

    The first module's output is detached and made a leaf that requires grad, so the backward
    pass stops there; the outputs of later modules are kept as they are (in the graph).
    ``slots[k]`` receives the output of ``modules[k]`` during the forward pass.
    """
    import torch

    previous = torch.is_grad_enabled()

    def first(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        slots[0] = leaf
        return leaf.clone()  # not the leaf itself: a later in-place op (DenseNet's ReLU) is fine

    def later(k: int) -> Any:
        def hook(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            slots[k] = output
            return output.clone()
        return hook

    handles = [modules[0].register_forward_hook(first)]
    handles += [m.register_forward_hook(later(k)) for k, m in enumerate(modules) if k > 0]
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(previous)


class Explainer:
    """Probabilities and saliency heat maps for batches, from a loaded classifier.

    Parameters
    ----------
    classifier:
        A :class:`fracture_node.ml.infer.Classifier`; its network, normalisation, device,
        test-time augmentation and lock are used as they are (nothing is copied or changed).
    method:
        One of :data:`METHODS`.
    layer:
        ``last``, ``stride16`` (see :func:`target_layer`), or ``fused``: the geometric mean of
        the two normalised maps (both from the same single backward pass).
    """

    def __init__(self, classifier: Any, method: str = DEFAULT_METHOD,
                 layer: str = DEFAULT_LAYER) -> None:
        if method not in METHODS:
            raise ModelError(
                f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
        self.classifier = classifier
        self.method = method
        self.layer = layer
        self.input_size: int = int(classifier.input_size)
        self.architecture = str(classifier.card["architecture"])
        # A graph engine (onnxruntime, openvino): the graph's class-evidence map is the HiResCAM
        # (= Grad-CAM) map of the last stage for a pooling + linear head
        # (fracture_node.ml.ort_engine).
        from fracture_node.ml.ort_engine import EVIDENCE_METHODS, GRAPH_ENGINES

        engine = getattr(classifier, "engine", "torch")
        self._from_graph = engine in GRAPH_ENGINES
        if self._from_graph:

            if layer != "last" or method not in EVIDENCE_METHODS or not classifier.has_evidence:
                raise ModelError(
                    f"saliency {method}@{layer} of architecture {self.architecture} needs the "
                    f"torch engine; the {engine} engine gives {' or '.join(EVIDENCE_METHODS)}"
                    " at layer last for pooling + linear heads")
            self.layer_name = str(classifier.evidence_layer or "last")
            self._layers = []
            return
        # The Classifier keeps its network private; infer.py exposes no accessor yet.
        self._net: nn.Module = classifier._net
        self._device: torch.device = classifier._device
        wanted = ("stride16", "last") if layer == "fused" else (layer,)
        found = [target_layer(self._net, self.architecture, w) for w in wanted]
        self.layer_name = "+".join(name for name, _ in found)
        self._layers = [module for _, module in found]

    def explain_batch(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float64], HeatMaps]:
        """Probabilities of ``fractured`` and heat maps ``[N, S, S]`` in [0, 1] (model input).

        The probabilities equal :meth:`Classifier.predict_batch` on the same batch (up to
        floating-point rounding).
        """
        probabilities, maps = self.explain_methods(batch, (self.method,))
        return probabilities, maps[self.method]

    def explain_methods(self, batch: NDArray[np.float32], methods: Sequence[str]
                        ) -> tuple[NDArray[np.float64], dict[str, HeatMaps]]:
        """Like :meth:`explain_batch`, with one heat map per method from the same passes."""
        for m in methods:
            if m not in METHODS:
                raise ModelError(f"unknown saliency method {m!r}; choose one of "
                                 f"{', '.join(METHODS)}")
        clf = self.classifier
        size = self.input_size
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (size, size):
            raise ValueError(f"expected a batch of shape [N, {size}, {size}], got {arr.shape}")
        if arr.shape[0] == 0:
            return (np.zeros(0, dtype=np.float64),
                    {m: np.zeros((0, size, size), dtype=np.float32) for m in methods})
        if self._from_graph:
            return self._from_evidence(arr, methods)
        passes = clf.in_passes(arr, lambda part: self.explain_methods(part, methods))
        if passes is not None:
            return (np.concatenate([p for p, _ in passes]),
                    {m: np.concatenate([maps[m] for _, maps in passes]) for m in methods})
        import torch

        x = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1).to(self._device)
        x = (x - clf._mean) / clf._std
        if self._device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        views = [x, torch.flip(x, dims=[3])] if clf.tta else [x]
        logits_sum: torch.Tensor | None = None
        cam_sum: dict[str, list[torch.Tensor]] = {}
        with clf._lock:
            for k, view in enumerate(views):
                logits, pairs = self._pass(view)
                logits_sum = logits if logits_sum is None else logits_sum + logits
                for m in methods:
                    per_layer = [cams(a, g, m) for a, g in pairs]
                    if k == 1:
                        per_layer = [torch.flip(c, dims=[2]) for c in per_layer]
                    if m in cam_sum:
                        per_layer = [c + d for c, d in zip(cam_sum[m], per_layer, strict=True)]
                    cam_sum[m] = per_layer
        assert logits_sum is not None
        probabilities = clf.probabilities(logits_sum / len(views))
        maps: dict[str, HeatMaps] = {}
        for m, per_layer in cam_sum.items():
            ups = [_upsample_normalised(c, size) for c in per_layer]
            fused = ups[0]
            for u in ups[1:]:
                fused = fused * u
            if len(ups) > 1:
                fused = _upsample_normalised(fused.pow(1.0 / len(ups)), size)
            maps[m] = fused.detach().float().cpu().numpy().astype(np.float32, copy=False)
        return probabilities, maps

    def _from_evidence(self, arr: NDArray[np.float32], methods: Sequence[str]
                       ) -> tuple[NDArray[np.float64], dict[str, HeatMaps]]:
        """A graph engine: one run of the graph gives the logits and the maps (no torch)."""
        from fracture_node.ml.ort_engine import EVIDENCE_METHODS, upsample_cams

        unsupported = [m for m in methods if m not in EVIDENCE_METHODS]
        if unsupported:
            raise ModelError(f"saliency method {unsupported[0]} needs the torch engine")
        probabilities, cams = self.classifier.evidence_batch(arr)
        heat = upsample_cams(cams, self.input_size)
        return probabilities, {m: heat for m in methods}

    def _pass(self, x: torch.Tensor
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One forward (graph from the first target layer on) and one backward to it."""
        import torch

        slots: list[torch.Tensor | None] = [None] * len(self._layers)
        use_amp = self._device.type == "cuda"
        amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                     else torch.float16)
        with _graph_from(self._layers, slots), torch.autocast(
            device_type=self._device.type, dtype=amp_dtype, enabled=use_amp
        ):
            logits = self._net(x).float().squeeze(1)
            activations = [a for a in slots if a is not None]
            if len(activations) != len(slots):
                raise ModelError(f"saliency layer {self.layer_name} was not run by the network")
            gradients = torch.autograd.grad(logits.sum(), activations)
        return logits.detach(), [(a.detach().float(), g.detach().float())
                                 for a, g in zip(activations, gradients, strict=True)]
