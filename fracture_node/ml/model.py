"""Fracture classifiers: torchvision architectures by name, and the model file with its card.

Architectures take a 1-channel grey image: the first convolution of the torchvision network is
replaced by a 1-input-channel convolution of the same shape (when local RGB pretrained weights
are given, its kernel is the sum of the RGB kernels, which is what the RGB network computes on a
grey image repeated over three channels). The head emits one logit (fractured).

The model file is ONE ``torch.save`` file of plain types and tensors, loadable with
``torch.load(..., weights_only=True)``::

    {"format": "fracture-node-model/1", "card": {...}, "state_dict": {...}}

A JSON copy of the card is written beside it (same stem, ``.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
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


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(1, conv.out_channels, kernel_size=conv.kernel_size,  # type: ignore[arg-type]
                    stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                    dilation=conv.dilation, groups=1,  # type: ignore[arg-type]
                    bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    return new


def _replace_head(model: nn.Module, arch: str) -> None:
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, 1)  # type: ignore[union-attr,arg-type]
    elif arch.startswith("densenet"):
        model.classifier = nn.Linear(model.classifier.in_features, 1)  # type: ignore[union-attr,arg-type]
    else:  # efficientnet, mobilenet_v3, convnext: Sequential classifier ending in a Linear
        seq = model.classifier
        assert isinstance(seq, nn.Sequential)
        last = seq[-1]
        assert isinstance(last, nn.Linear)
        seq[-1] = nn.Linear(last.in_features, 1)


def build_model(arch: str, pretrained: str | Path | None = None) -> nn.Module:
    """Build ``arch`` for 1-channel input and one logit, optionally from local RGB weights.

    Parameters
    ----------
    arch:
        One of :data:`ARCHITECTURES`.
    pretrained:
        A torchvision ``state_dict`` file of the same architecture (ImageNet weights, say),
        loaded with ``weights_only=True``; the classifier head is re-initialised. A
        fracture-node model file (1-channel stem, one logit) is loaded whole, head included,
        to fine-tune it (on a hospital's own images, say, or at another input size).

    Raises
    ------
    ModelError
        Unknown architecture, or an unreadable or mismatched weights file.
    """
    if arch not in _BUILDERS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = _BUILDERS[arch](weights=None)
    parent, attr, conv = _first_conv(model)
    state = _read_state(Path(pretrained)) if pretrained is not None else None
    if state is not None and not _is_grey_state(state, model):
        _load_state(model, state, arch, Path(pretrained))  # type: ignore[arg-type]
        state = None
    setattr(parent, attr, _grey_conv(conv))
    _replace_head(model, arch)
    if state is not None:  # a fracture-node model (1-channel stem, 1 logit): continue from it
        _load_state(model, state, arch, Path(pretrained))  # type: ignore[arg-type]
    return model


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
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"pretrained weights file {path.name} does not match architecture {arch}: {exc}"
        ) from exc


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
        return model.eval()


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
    if card["architecture"] not in _BUILDERS:
        raise ModelError(f"model file {path.name}: unknown architecture {card['architecture']!r}")
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
