"""Inference: a loaded fracture model that turns prepared grey images into probabilities.

The daemon's worker calls :meth:`Classifier.prepare` on decode threads (pure numpy) and
:meth:`Classifier.predict_batch` on stacked batches.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fracture_node.errors import ModelError
from fracture_node.images import FloatImage, letterbox
from fracture_node.logs import get_logger
from fracture_node.ml.model import ModelFile, load_model_file

log = get_logger("ml.infer")

BUNDLED_NAME = "fracture-model.pt"
OPERATING_POINTS = ("balanced", "high_sensitivity")


def bundled_model_path() -> Path:
    """Where the model shipped with the package lives."""
    try:
        ref = resources.files("fracture_node").joinpath("models", BUNDLED_NAME)
        return Path(str(ref))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[1] / "models" / BUNDLED_NAME


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return dev


class Classifier:
    """A fracture model ready to score batches of prepared images.

    Use :meth:`load`; ``predict_batch`` is serialised by a lock, ``prepare`` is thread-safe.
    """

    def __init__(self, model_file: ModelFile, device: torch.device) -> None:
        card = model_file.card
        self.card: dict[str, Any] = card
        self.name: str = str(card["name"])
        self.version: str = str(card["version"])
        self.sha256: str = model_file.sha256
        self.input_size: int = int(card["input_size"])
        self.device: str = str(device)
        self.path: Path = model_file.path
        norm = card.get("normalisation") or {}
        self._mean = float(norm.get("mean", 0.0))
        self._std = float(norm.get("std", 1.0)) or 1.0
        self.tta: bool = bool(card.get("tta", False))
        cal = card.get("calibration")
        # Platt scaling fitted on val (see :func:`fracture_node.ml.metrics.fit_platt`); None for
        # a model file without one, whose probabilities are the network's sigmoid as before.
        self.calibration: tuple[float, float] | None = (
            (float(cal["slope"]), float(cal["intercept"])) if cal else None)
        self._device = device
        self._net = model_file.build().to(device)
        if device.type == "cpu":
            self._net = self._net.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str | None = None, device: str = "auto") -> Classifier:
        """Load a model file (``None``: the bundled model) onto ``device``.

        Raises
        ------
        ModelError
            The file is missing, corrupt or of another format, or the device is unusable.
        """
        target = Path(path) if path is not None else bundled_model_path()
        clf = cls(load_model_file(target), resolve_device(device))
        log.info("model_loaded", model=clf.name, version=clf.version, sha256=clf.sha256,
                 device=clf.device, input_size=clf.input_size, tta=clf.tta)
        return clf

    def threshold(self, operating_point: str) -> float:
        """The probability threshold of a named operating point, or a number given as text."""
        thresholds = self.card.get("thresholds") or {}
        if operating_point in thresholds:
            return float(thresholds[operating_point])
        try:
            value = float(operating_point)
        except ValueError:
            raise ModelError(
                f"unknown operating point {operating_point!r}: use "
                f"{', '.join(sorted(thresholds)) or 'a number'} or a number in [0, 1]"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise ModelError(f"threshold {value} is outside [0, 1]")
        return value

    def prepare(self, image: FloatImage) -> NDArray[np.float32]:
        """Letterbox a normalised grey image to the model's input size (numpy, thread-safe)."""
        return letterbox(image, self.input_size)

    def predict_batch(self, batch: NDArray[np.float32]) -> NDArray[np.float64]:
        """Probabilities of ``fractured`` for prepared images ``[N, S, S]`` in [0, 1]."""
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected a batch of shape [N, {self.input_size}, {self.input_size}], "
                f"got {arr.shape}"
            )
        if arr.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        x = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1).to(self._device)
        x = (x - self._mean) / self._std
        if self._device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        use_amp = self._device.type == "cuda"
        amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                     else torch.float16)
        with self._lock, torch.inference_mode(), torch.autocast(
            device_type=self._device.type, dtype=amp_dtype, enabled=use_amp
        ):
            logits = self._net(x).float().squeeze(1)
            if self.tta:
                logits = (logits + self._net(torch.flip(x, dims=[3])).float().squeeze(1)) / 2
        return self.probabilities(logits)

    def probabilities(self, logits: torch.Tensor) -> NDArray[np.float64]:
        """Probabilities of ``fractured`` from the network's (TTA-averaged) logits.

        With a calibration in the card, ``sigmoid(slope * logit + intercept)``: a monotone map,
        so ranking (AUROC) is unchanged and the card's thresholds are on this same scale.
        """
        z = logits.detach().double()
        if self.calibration is not None:
            slope, intercept = self.calibration
            z = slope * z + intercept
        return torch.sigmoid(z).cpu().numpy()
