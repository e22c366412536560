"""Join trained model files into one ensemble model file (``fracture-node model ensemble``).

The members are EfficientNet-Lite model files trained for the same input (input size and grey
normalisation). The result is ONE model file, like any other: its architecture names the members
(``efficientnet_lite0+efficientnet_lite1``), its weights are theirs under ``members.<k>.`` with
the joined head (:class:`~fracture_node.ml.model.Ensemble`: the mean of the members' logits),
and its card lists each member's name, version and sha256. Then, as at the end of training,
:func:`~fracture_node.ml.finalize.finalize` scores val through the serving path, decides on
flip TTA, fits the calibration and fixes both thresholds on the ensemble's own val scores.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fracture_node import __version__
from fracture_node.errors import ModelError
from fracture_node.logs import get_logger
from fracture_node.ml.finalize import THRESHOLD_RULES, finalize
from fracture_node.ml.model import (
    ENSEMBLE_JOIN,
    Ensemble,
    ModelFile,
    is_lite,
    load_model_file,
    save_model_file,
)

log = get_logger("ml.ensemble")

def _common(members: list[ModelFile], key: str) -> Any:
    values = {m.path.name: m.card.get(key) for m in members}
    if len({repr(v) for v in values.values()}) != 1:
        listed = ", ".join(f"{name}: {value}" for name, value in values.items())
        raise ModelError(f"ensemble members must share their {key} ({listed})")
    return next(iter(values.values()))


def join_members(members: list[ModelFile], name: str, version: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ensemble's weights and card (before finalizing) from loaded member files.

    Raises
    ------
    ModelError
        Fewer than two members, a member that is not EfficientNet-Lite, or members trained for
        different inputs.
    """
    if len(members) < 2:
        raise ModelError("an ensemble needs two or more model files")
    for m in members:
        arch = str(m.card["architecture"])
        if not is_lite(arch):
            raise ModelError(f"ensemble member {m.path.name} is {arch}; members must be "
                             "EfficientNet-Lite networks (pooling + linear head)")
    size = int(_common(members, "input_size"))
    normalisation = _common(members, "normalisation")
    net = Ensemble([str(m.card["architecture"]) for m in members])
    for k, m in enumerate(members):
        net.members[k].load_state_dict({key: v.float() for key, v in m.state_dict.items()},
                                       strict=True)
    net.join_heads()
    now = dt.datetime.now(dt.UTC)
    described = [{"name": m.card["name"], "version": m.card["version"],
                  "architecture": m.card["architecture"], "sha256": m.sha256,
                  "file": m.path.name, "val_auroc": (m.card.get("val_metrics") or {}).get("auroc"),
                  "training": m.card.get("training"), "history": m.card.get("history")}
                 for m in members]
    card: dict[str, Any] = {
        "name": name,
        "version": version or now.strftime("%Y.%m.%d-%H%M"),
        "architecture": ENSEMBLE_JOIN.join(str(m.card["architecture"]) for m in members),
        "input_size": size,
        "input": _common(members, "input"),
        "normalisation": normalisation,
        "members": described,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.5},  # fixed on val by finalize
        "threshold_rules": THRESHOLD_RULES,
        "tta": False,
        "training_data": _common(members, "training_data"),
        "test_metrics": None,
        "created": now.isoformat(timespec="seconds"),
        "fracture_node_version": __version__,
        "torch_version": torch.__version__,
    }
    return net.state_dict(), card


def build_ensemble(member_paths: list[Path], out: Path, data: Path, *, name: str = "fracture-model",
                   version: str | None = None, cache_dir: Path = Path(".cache"), workers: int = 2,
                   calibrate: bool = True, float16: bool = True, val_limit: int = 0) -> str:
    """Write the ensemble of ``member_paths`` to ``out``, finalized on the val split of ``data``
    (TTA decision, calibration, thresholds); return its sha256.

    ``val_limit`` takes N val images drawn at random (seed 1; tests); ``float16`` stores the weights in
    float16, as ``train`` does by default.
    """
    from fracture_node.ml.data import cache_split, load_records, split_records

    members = [load_model_file(p) for p in member_paths]
    state, card = join_members(members, name, version)
    save_model_file(out, state, card, torch.float16 if float16 else None)
    records = split_records(load_records(data), "val")
    if val_limit:
        picked = np.random.default_rng(1).permutation(len(records))[:val_limit]
        records = [records[i] for i in sorted(picked)]
    val = cache_split(records, int(card["input_size"]), cache_dir, workers, "val")
    training = {"ensemble_of": [m["file"] for m in card["members"]],
                "data": card["training_data"]}
    sha = finalize(out, val, "cpu", [], training, None, calibrate=calibrate)
    log.info("ensemble_written", path=str(out), sha256=sha, members=len(members))
    return sha
