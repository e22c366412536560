"""Inference: a loaded fracture model that turns prepared grey images into probabilities.

The daemon's worker calls :meth:`Classifier.prepare` on decode threads (pure numpy) and
:meth:`Classifier.predict_batch` on stacked batches.

Three engines run the same model file (:data:`ENGINES`, ``[model] engine``): ``torch`` (the
training engine, and the one for a GPU), and the two CPU serving engines of the graph exported
from the model file (:func:`fracture_node.ml.onnx_export.export_onnx`, ``<model>.onnx``):
``openvino`` (:mod:`fracture_node.ml.ov_engine`) and ``onnxruntime``
(:mod:`fracture_node.ml.ort_engine`), several times torch's images per second on a CPU
(docs/benchmarks.md). ``auto`` takes a graph engine on the CPU (openvino when it can be imported,
else onnxruntime: :data:`GRAPH_ENGINES`) when the graph can serve what is asked (its saliency
included), and torch on a GPU. A graph is only run when the sha256 it records is that of the model file: otherwise it is exported
again (torch present) or refused, with a logged event naming both hashes. Whatever the engine,
the classifier's identity (:attr:`Classifier.sha256`, recorded with every result) is the model
file's sha256.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from fracture_node.errors import ModelError
from fracture_node.images import FloatImage, letterbox
from fracture_node.logs import get_logger
from fracture_node.ml import ort_engine as oe

if TYPE_CHECKING:
    import torch

    from fracture_node.ml.model import ModelFile

log = get_logger("ml.infer")
T = TypeVar("T")

BUNDLED_NAME = "fracture-model.pt"
OPERATING_POINTS = ("balanced", "high_sensitivity")
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
GRAPH_ENGINES = oe.GRAPH_ENGINES
CPU_SUB_BATCH = 2
"""Images per pass of the network on a CPU (:attr:`Classifier.sub_batch`), every engine.

A batch of 16 radiographs at 384 px (32 network inputs with flip TTA) holds activations of
hundreds of MiB, far more than a CPU's caches; in passes of 2 images the same work runs
1.5-1.7x as fast on torch, 1.25x on ONNX Runtime and no slower on OpenVINO (docs/benchmarks.md,
``benchmarks/sub_batch.py``). The worker still
claims, decodes and commits whole batches; only the network's passes are smaller. A GPU takes the
whole batch."""


def bundled_model_path() -> Path:
    """Where the model shipped with the package lives."""
    try:
        ref = resources.files("fracture_node").joinpath("models", BUNDLED_NAME)
        return Path(str(ref))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[1] / "models" / BUNDLED_NAME


def default_sub_batch(device: str) -> int:
    """Images per pass of the network on ``device``: :data:`CPU_SUB_BATCH` on a CPU, 0 (the
    whole batch) on a GPU."""
    return CPU_SUB_BATCH if str(device) == "cpu" else 0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; anything else is passed to torch."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return dev


GPU_DEVICE_FILES: tuple[str, ...] = ("/dev/nvidiactl", "/dev/kfd")
"""The device files a GPU driver creates (NVIDIA's, AMD ROCm's): torch's CUDA (or ROCm) backend
finds no GPU where none of them exists."""


def cpu_without_torch(device: str) -> bool:
    """True when ``device`` is the CPU whatever torch says: ``cpu``, or ``auto`` where torch is
    not installed (a serving install) or no GPU driver is loaded (:data:`GPU_DEVICE_FILES`).
    Imports torch only to ask CUDA (``auto`` with a GPU driver present), so that a CPU server
    with torch installed does not carry it in memory."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if not any(Path(f).exists() for f in GPU_DEVICE_FILES):
        return True
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def graph_engine_available(engine: str) -> bool:
    """True when the package of a graph engine (:data:`GRAPH_ENGINES`) can be imported here."""
    if engine == "openvino":
        from fracture_node.ml import ov_engine

        return ov_engine.available()
    return oe.available()


def cpu_graph_engine() -> str | None:
    """The graph engine ``auto`` takes on a CPU: the first of :data:`GRAPH_ENGINES` installed."""
    return next((e for e in GRAPH_ENGINES if graph_engine_available(e)), None)


def open_graph(engine: str, path: Path, threads: int = 0) -> oe.GraphRunner:
    """A graph file opened by a graph engine (:data:`GRAPH_ENGINES`).

    Raises
    ------
    ModelError
        The engine's package is missing, or the file is not a graph written by fracture-node.
    """
    if engine == "openvino":
        from fracture_node.ml.ov_engine import OvRunner

        return OvRunner(path, threads)
    return oe.OrtRunner(path, threads)


@dataclass(frozen=True)
class GraphModel:
    """A model file known through its ONNX graph: its path, the card recorded in the graph, and
    the sha256 of the model file's bytes (which the graph records as its source)."""

    path: Path
    card: dict[str, Any]
    sha256: str


def find_graph(model_path: Path, sha256: str, threads: int = 0,
               cache_dir: Path | None = None, quiet: bool = False,
               engine: str = "onnxruntime") -> oe.GraphRunner | None:
    """The graph exported from the model file with this sha256, beside it or in ``cache_dir``,
    opened by ``engine``; None when there is none. Graphs of another model file are
    logged (``onnx_stale``, both hashes; unless ``quiet``) and never returned."""
    for place in _graph_places(model_path, cache_dir):
        if not place.is_file():
            continue
        try:
            runner = open_graph(engine, place, threads)
        except ModelError as exc:
            if not quiet:
                log.warning("onnx_unreadable", path=str(place), error=str(exc))
            continue
        if runner.source_sha256 == sha256:
            return runner
        if not quiet:
            log.warning("onnx_stale", path=str(place), onnx_source_sha256=runner.source_sha256,
                        model_sha256=sha256,
                        detail="graph exported from another model file: not used")
    return None


def _stale_notes(places: list[Path], engine: str = "onnxruntime") -> list[str]:
    """What the graphs in ``places`` record as their source, for an error message."""
    notes = []
    for place in places:
        try:
            recorded = open_graph(engine, place).source_sha256 if place.is_file() else None
        except ModelError:
            recorded = None
        if recorded is not None:
            notes.append(f"{place.name} records sha256 {recorded or 'none'}")
    return notes


def _graph_places(model_path: Path, cache_dir: Path | None) -> list[Path]:
    places = [oe.onnx_path_for(model_path)]
    if cache_dir is not None:
        places.append(Path(cache_dir) / f"{Path(model_path).stem}.onnx")
    return places


def onnx_unfit(model_file: ModelFile | GraphModel, saliency: tuple[str, str] | None,
               engine: str | None = "onnxruntime") -> str | None:
    """Why the graph engine ``engine`` cannot serve this model (with this saliency), or None
    (``engine`` None: no graph engine is installed)."""
    if engine is None:
        return f"none of {', '.join(GRAPH_ENGINES)} is installed"
    if not graph_engine_available(engine):
        return f"{engine} is not installed"
    if saliency is not None:
        method, layer = saliency
        if layer != "last" or method not in oe.EVIDENCE_METHODS:
            return (f"saliency {method}@{layer} needs the torch engine ({engine} gives "
                    f"{' or '.join(oe.EVIDENCE_METHODS)} at layer last)")
        arch = str(model_file.card["architecture"])
        if not oe.has_evidence_map(arch):
            return (f"architecture {arch} has no class-evidence map, so saliency needs the "
                    "torch engine")
    return None


def obtain_graph(model_file: ModelFile, threads: int = 0, cache_dir: Path | None = None,
                 engine: str = "onnxruntime") -> oe.GraphRunner:
    """The ONNX graph of a model file opened by ``engine``, exported when needed.

    Looks beside the model file (``<model>.onnx``), then in ``cache_dir``. A graph recorded as
    exported from another model file is logged (``onnx_stale``, both hashes) and replaced by a
    new export; without torch, or when no place can be written, it is refused.

    Raises
    ------
    ModelError
        No graph of this model file can be found or exported (the message names the hashes).
    """
    places = _graph_places(model_file.path, cache_dir)
    found = find_graph(model_file.path, model_file.sha256, threads, cache_dir, engine=engine)
    if found is not None:
        return found
    stale = _stale_notes(places, engine)
    errors: list[str] = []
    for place in places:
        try:
            from fracture_node.ml.onnx_export import export_onnx

            runner = open_graph(engine, export_onnx(model_file, place), threads)
            oe.check_source(runner, model_file.sha256)
            return runner
        except (ModelError, ImportError) as exc:
            log.warning("onnx_export_failed", path=str(place), error=str(exc))
            errors.append(str(exc))
    raise ModelError(
        f"no ONNX graph of model file {model_file.path.name} (sha256 {model_file.sha256})"
        f"{' (' + '; '.join(stale) + ')' if stale else ''} and none could be exported: "
        f"{'; '.join(errors)}")


def _without_torch(target: Path, engine: str, saliency: tuple[str, str] | None,
                   cache_dir: Path | None) -> str:
    """Why a model file cannot be served here without torch (graphs of another file logged)."""
    if engine == "torch":
        return ("[model] engine = torch needs torch, which is not installed here: install the "
                "torch extra (pip install 'fracture-node[torch]'; scripts/setup.sh does when "
                "nvidia-smi finds a GPU), or set engine = \"auto\" to serve on openvino or "
                "onnxruntime")
    graph = engine if engine in GRAPH_ENGINES else cpu_graph_engine()
    if graph is None or not graph_engine_available(graph):
        return (f"[model] engine = {engine} needs {graph or 'openvino, onnxruntime'} or torch, "
                "and neither is installed here: reinstall fracture-node (scripts/setup.sh)")
    sha256 = oe.file_sha256(target)
    # logs onnx_stale, both hashes
    runner = find_graph(target, sha256, cache_dir=cache_dir, engine=graph)
    if runner is not None:
        why = str(onnx_unfit(GraphModel(target, runner.card(), sha256), saliency, graph))
    else:
        notes = _stale_notes(_graph_places(target, cache_dir), graph)
        why = (f"its ONNX graph was exported from another model file ({'; '.join(notes)})"
               if notes else "it has no ONNX graph")
    return (f"model file {target.name} (sha256 {sha256}) cannot be served without torch: {why}; "
            "export its graph with `fracture-node model export` where torch is installed, "
            "or install torch here")


class Classifier:
    """A fracture model ready to score batches of prepared images.

    Use :meth:`load`; ``predict_batch`` is serialised by a lock, ``prepare`` is thread-safe.
    ``engine`` says what runs the network (``torch``, or a graph engine of
    :data:`GRAPH_ENGINES` with ``runner``).
    """

    def __init__(self, model_file: ModelFile | GraphModel, device: Any, engine: str = "torch",
                 runner: oe.GraphRunner | None = None) -> None:
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
        self.engine: str = engine
        self._runner = runner
        self.onnx_path: Path | None = None
        self._net: Any = None
        if engine in GRAPH_ENGINES:
            if runner is None or runner.engine != engine or str(device) != "cpu":
                raise ModelError(f"the {engine} engine needs its graph and the CPU")
            oe.check_source(runner, self.sha256)
            self.onnx_path = runner.path
            self.has_evidence: bool = runner.has_evidence
            self.evidence_layer: str = runner.evidence_layer
        elif engine == "torch":
            import torch

            assert not isinstance(model_file, GraphModel)
            self._net = model_file.build().to(device)
            if device.type == "cpu":
                self._net = self._net.to(memory_format=torch.channels_last)
            self.has_evidence = oe.has_evidence_map(str(card["architecture"]))
            self.evidence_layer = ""
        else:
            raise ModelError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        self.sub_batch: int = default_sub_batch(str(device))
        """Images per pass of the network (0: the whole batch in one pass); results do not
        depend on it (:data:`CPU_SUB_BATCH`)."""
        self._lock = threading.Lock()

    def in_passes(self, batch: NDArray[np.float32], fn: Callable[[NDArray[np.float32]], T]
                  ) -> list[T] | None:
        """``fn`` on each pass of :attr:`sub_batch` images of ``batch``, in order; None when
        the batch is a single pass (``fn`` is then the caller's own work)."""
        step = self.sub_batch
        if not 0 < step < batch.shape[0]:
            return None
        return [fn(batch[i:i + step]) for i in range(0, batch.shape[0], step)]

    @classmethod
    def load(cls, path: Path | str | None = None, device: str = "auto", engine: str = "torch",
             threads: int = 0, saliency: tuple[str, str] | None = None,
             cache_dir: Path | None = None, sub_batch: int | None = None) -> Classifier:
        """Load a model file (``None``: the bundled model) onto ``device`` with ``engine``.

        Parameters
        ----------
        engine:
            ``torch``, ``openvino`` or ``onnxruntime`` (CPU only), or ``auto``: on the CPU the
            graph engine of :func:`cpu_graph_engine` when :func:`onnx_unfit` finds nothing
            against it and its graph can be found or exported (:func:`obtain_graph`), torch
            otherwise (each choice logged).
        threads:
            Intra-op threads of the engine (0: the engine's default).
        saliency:
            ``(method, layer)`` the classifier must explain, or None.
        cache_dir:
            Where a graph is exported when the model file's folder cannot be written.
        sub_batch:
            Images per pass of the network (:attr:`sub_batch`; 0: the whole batch); None: the
            device's default (:func:`default_sub_batch`).

        Raises
        ------
        ModelError
            The file is missing, corrupt or of another format, the device is unusable, or a
            graph engine was asked for and cannot serve this model.
        """
        if engine not in ENGINES:
            raise ModelError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        target = Path(path) if path is not None else bundled_model_path()
        if engine in GRAPH_ENGINES and device == "auto":
            device = "cpu"
        graph = engine if engine in GRAPH_ENGINES else None
        if engine == "auto" and cpu_without_torch(device):
            graph = cpu_graph_engine()
        if graph is not None and graph_engine_available(graph) and cpu_without_torch(device):
            # The graph of this very file (its sha256) carries the card: no torch needed.
            sha256 = oe.file_sha256(target)
            runner = find_graph(target, sha256, threads, cache_dir, quiet=True, engine=graph)
            if runner is not None:
                known = GraphModel(target, runner.card(), sha256)
                if onnx_unfit(known, saliency, graph) is None:
                    return cls._loaded(cls(known, "cpu", graph, runner), engine,
                                       "configured" if engine == graph else "auto: cpu",
                                       sub_batch)
        try:
            from fracture_node.ml.model import load_model_file
        except ImportError as exc:  # a serving install without torch
            raise ModelError(_without_torch(target, engine, saliency, cache_dir)) from exc
        model_file = load_model_file(target)
        dev = resolve_device(device)
        chosen, runner, reason = cls._choose(model_file, dev, engine, threads, saliency,
                                             cache_dir)
        if chosen == "torch" and threads > 0:
            import torch

            torch.set_num_threads(threads)
        return cls._loaded(cls(model_file, dev, chosen, runner), engine, reason, sub_batch)

    @staticmethod
    def _loaded(clf: Classifier, engine: str, reason: str, sub_batch: int | None = None
                ) -> Classifier:
        if sub_batch is not None:
            if sub_batch < 0:
                raise ModelError(f"sub_batch must be 0 (the whole batch) or positive, "
                                 f"not {sub_batch}")
            clf.sub_batch = sub_batch
        log.info("model_loaded", model=clf.name, version=clf.version, sha256=clf.sha256,
                 device=clf.device, engine=clf.engine, engine_requested=engine, reason=reason,
                 onnx=str(clf.onnx_path) if clf.onnx_path else None,
                 input_size=clf.input_size, tta=clf.tta, sub_batch=clf.sub_batch)
        return clf

    @staticmethod
    def _choose(model_file: ModelFile, device: torch.device, engine: str, threads: int,
                saliency: tuple[str, str] | None, cache_dir: Path | None
                ) -> tuple[str, oe.GraphRunner | None, str]:
        """The engine to run, its graph (a graph engine), and why."""
        if engine == "torch":
            return "torch", None, "configured"
        if device.type != "cpu":
            if engine in GRAPH_ENGINES:
                raise ModelError(f"[model] engine = {engine} runs on the CPU, not on "
                                 f"{device}; set device = \"cpu\" or engine = \"torch\"")
            return "torch", None, f"auto: {device.type} device"
        graph = engine if engine in GRAPH_ENGINES else cpu_graph_engine()
        unfit = onnx_unfit(model_file, saliency, graph)
        if engine in GRAPH_ENGINES:
            if unfit:
                raise ModelError(f"[model] engine = {engine} cannot serve model file "
                                 f"{model_file.path.name}: {unfit}; set engine = \"torch\"")
            return engine, obtain_graph(model_file, threads, cache_dir, engine), "configured"
        if unfit or graph is None:
            log.warning("engine_fallback", engine="torch", reason=unfit)
            return "torch", None, f"auto: {unfit}"
        try:
            return graph, obtain_graph(model_file, threads, cache_dir, graph), "auto: cpu"
        except ModelError as exc:
            log.error("engine_fallback", engine="torch", reason=str(exc))
            return "torch", None, "auto: no usable ONNX graph"

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
        passes = self.in_passes(arr, self.predict_batch)
        if passes is not None:
            return np.concatenate(passes)
        if self._runner is not None:
            with self._lock:
                logits, _ = self._runner.run(arr, self.tta, evidence=False)
            return self.probabilities(logits)
        import torch

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

    def evidence_batch(self, batch: NDArray[np.float32]
                       ) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
        """A graph engine: probabilities and class activation maps ``[N, h, w]`` (>= 0, the
        test-time views summed) of prepared images ``[N, S, S]``, from one run of the graph."""
        if self._runner is None:
            raise ModelError(f"evidence_batch needs a graph engine ({', '.join(GRAPH_ENGINES)})")
        arr = np.asarray(batch, dtype=np.float32)
        passes = self.in_passes(arr, self.evidence_batch)
        if passes is not None:
            return (np.concatenate([p for p, _ in passes]),
                    np.concatenate([c for _, c in passes]))
        with self._lock:
            logits, cams = self._runner.run(arr, self.tta, evidence=True)
        assert cams is not None
        return self.probabilities(logits), cams

    def probabilities(self, logits: Any) -> NDArray[np.float64]:
        """Probabilities of ``fractured`` from the network's (TTA-averaged) logits.

        With a calibration in the card, ``sigmoid(slope * logit + intercept)``: a monotone map,
        so ranking (AUROC) is unchanged and the card's thresholds are on this same scale.
        ``logits``: a torch tensor or a numpy array.
        """
        if hasattr(logits, "detach"):  # a torch tensor
            logits = logits.detach().double().cpu().numpy()
        z = np.asarray(logits, dtype=np.float64)
        if self.calibration is not None:
            slope, intercept = self.calibration
            z = slope * z + intercept
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
