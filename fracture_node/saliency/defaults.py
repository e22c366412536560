"""Saliency's choices and defaults: methods, target layers, region threshold and count.

A torch-free leaf: :mod:`fracture_node.config` checks ``[saliency]`` against it without importing
:mod:`fracture_node.ml`, and :mod:`fracture_node.ml.explain` (which computes the maps) takes its
defaults from it.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "hirescam", "layercam")
DEFAULT_METHOD = "hirescam"
LAYERS: tuple[str, ...] = ("last", "stride16", "fused")
DEFAULT_LAYER = "last"
"""The last stage: the bundled model is trained to put its evidence there inside the fracture
boxes, and HiResCAM there had the best pointing game on the val split (0.28 vs 0.05 at
stride 16, docs/model-card-saliency.md) at the lowest cost (about +2% vs +18%)."""
DEFAULT_THRESHOLD = 0.8
"""A region is where the map reaches this fraction of its maximum over the image. Chosen on the
val split for the bundled model: mean IoU of the top region with the fracture box 0.137 at 0.8
against 0.062 at 0.5 (0.149 at 0.9, where the region shrinks to about one map cell whatever the
fracture; docs/model-card-saliency.md)."""
DEFAULT_MAX_REGIONS = 3
