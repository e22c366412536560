"""The class-evidence map of networks with a pooling + linear head, and box supervision on it.

For a global-average-pooling + linear head, the linear layer applied at every position of the
last stage gives a map whose mean is exactly the logit (:func:`forward_with_map`); training can
push its mass into the fracture boxes (:func:`box_loss`) and score where its peak falls
(:func:`pointing_hits`). The ONNX graph exports the same map as its ``evidence`` output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fracture_node.errors import FractureNodeError
from fracture_node.ml.explain import upsample
from fracture_node.ml.model import pools_features


def supports_evidence_map(arch: str) -> bool:
    """Architectures whose head is global-average pooling then one linear layer (and ensembles
    of EfficientNet-Lite, which are one such network: :class:`~fracture_node.ml.model.Ensemble`)."""
    return pools_features(arch) or arch.startswith(("resnet", "densenet"))


def forward_with_map(model: nn.Module, arch: str, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit ``[B]`` and the class-evidence map ``[B, h, w]`` of the last stage.

    For a GAP + linear head the logit is exactly the mean of the map (the linear layer applied
    at every position), so this is the network's own forward pass; the map is the last-stage
    HiResCAM / CAM before ReLU and normalisation.
    """
    m: Any = model
    if pools_features(arch):
        f = m.forward_features(x)
        head = m.classifier
    elif arch.startswith("resnet"):
        f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        head = m.fc
    elif arch.startswith("densenet"):
        f = F.relu(m.features(x))
        head = m.classifier
    else:
        raise FractureNodeError(f"no class-evidence map for architecture {arch}")
    emap = F.conv2d(f, head.weight[:, :, None, None], head.bias).squeeze(1)
    return emap.mean(dim=(1, 2)), emap


def box_loss(emap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
    """``-log`` of the softmax mass of the evidence map inside the boxes, over boxed images.

    ``masks`` ``[B, 1, S, S]`` (augmented, 0 where no box) are max-pooled to the map's grid; a
    cell counts as inside when it overlaps a box. Images with no box cell are left out; None
    when no image of the batch has one.
    """
    cells = F.adaptive_max_pool2d(masks, emap.shape[-2:]).flatten(1) > 0.25
    keep = cells.any(dim=1)
    if not bool(keep.any()):
        return None
    logp = F.log_softmax(emap.float().flatten(1)[keep], dim=1)
    inside = torch.logsumexp(logp.masked_fill(~cells[keep], float("-inf")), dim=1)
    return -inside.mean()


def pointing_hits(emap: torch.Tensor, boxes: list[list[tuple[float, float, float, float]]],
                  size: int) -> list[bool]:
    """Per boxed image: does the map's peak fall inside one of its boxes?

    The map is upsampled to the input size as the daemon's saliency does
    (:func:`fracture_node.ml.explain.upsample`), so the peak can lie between two cell centres
    and the per-epoch figure is the one the daemon would give (without its flip view).
    """
    keep = [k for k, image_boxes in enumerate(boxes) if image_boxes]
    if not keep:
        return []
    flat = upsample(emap[keep].float(), size).flatten(1).argmax(dim=1).tolist()
    hits = []
    for k, peak in zip(keep, flat, strict=True):
        cy, cx = peak // size + 0.5, peak % size + 0.5
        hits.append(any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes[k]))
    return hits
