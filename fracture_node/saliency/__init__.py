"""Saliency, torch-free: where the model looked, once a map is computed.

:mod:`~fracture_node.saliency.defaults` holds the choices and defaults ``[saliency]`` is checked
against; :mod:`~fracture_node.saliency.geometry` maps model-input heat maps onto the source image
and finds regions; :mod:`~fracture_node.saliency.record` is what ``results.saliency`` keeps. The
maps themselves are computed in :mod:`fracture_node.ml.explain` (torch) or by the ONNX graph.
"""

from __future__ import annotations

from fracture_node.saliency.geometry import Region
from fracture_node.saliency.record import SaliencyRecord

__all__ = ["Region", "SaliencyRecord"]
