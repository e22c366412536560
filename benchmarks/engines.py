"""Inference engines on one model, one run: images/s of torch eager and ONNX Runtime, and ratios.

    .venv/bin/python benchmarks/engines.py [--model F | --build efficientnet_lite0:384]
        [--batch 16] [--sub-batch 2] [--threads 2] [--seconds 8] [--compile]

For each engine, on a batch of real val radiographs of the serving batch size (``[model]
max_batch``, 16), already letterboxed (the model's work alone), four modes: plain, flip TTA,
saliency (the class-evidence map, HiResCAM at the last stage, what the worker runs by default),
and TTA + saliency. Every engine runs the batch in passes of ``--sub-batch`` images, as the node
does on a CPU (``[model] sub_batch``, :data:`fracture_node.ml.infer.CPU_SUB_BATCH`); ``--sub-batch
0`` runs the whole batch in one pass. Engines:

- ``torch``: eager, NCHW contiguous;
- ``torch_cl``: eager, channels-last (what ``[model] engine = "torch"`` runs on a CPU); its
  saliency is the explainer's backward pass;
- ``torch_compile`` (``--compile``): ``torch.compile`` of the network, channels-last;
- ``onnxruntime``: the graph exported from the model file (CPU execution provider, all graph
  optimisations), as ``[model] engine = "onnxruntime"`` runs it; saliency is its second output;
- ``openvino`` / ``openvino_bf16`` (where the ``openvino`` package imports): the same graph
  compiled by OpenVINO for the CPU, f32 (:class:`fracture_node.ml.ov_engine.OvRunner`, as
  ``[model] engine = "openvino"`` runs it: the precision the parity tests demand) and bf16 (its
  default on CPUs with native bf16, printed with its logit difference so that the price of its
  speed is in the same line).

Prints one JSON line per measurement, then a summary object with the ratios of ONNX Runtime
and of each OpenVINO precision to ``torch_cl`` (and OpenVINO's to ONNX Runtime), and the largest
logit difference of each from torch on the batch.
``--build ARCH:SIZE`` makes a model file in a temporary folder from the project's builders
(ImageNet weights where installed, else random) instead of using ``--model``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from fracture_node.images import load_image_file  # noqa: E402
from fracture_node.ml.data import load_records, split_records  # noqa: E402
from fracture_node.ml.explain import Explainer  # noqa: E402
from fracture_node.ml.infer import CPU_SUB_BATCH, Classifier, bundled_model_path  # noqa: E402
from fracture_node.ml.model import (  # noqa: E402
    IMAGENET,
    IMAGENET_GREY,
    build_model,
    is_lite,
    save_model_file,
)
from fracture_node.ml.onnx_export import export_onnx  # noqa: E402
from fracture_node.ml.ort_engine import onnx_path_for  # noqa: E402
from fracture_node.ml.ov_engine import OvRunner  # noqa: E402
from fracture_node.ml.ov_engine import available as ov_available  # noqa: E402

MODES = (("plain", False, False), ("tta", True, False), ("saliency", False, True),
         ("tta+saliency", True, True))


def build(spec: str, folder: Path) -> Path:
    """A model file of ``ARCH:SIZE`` from the project's builders."""
    arch, size = spec.split(":")
    torch.manual_seed(0)
    pretrained = IMAGENET if is_lite(arch) else None
    try:
        net = build_model(arch, pretrained=pretrained)
    except Exception:
        net, pretrained = build_model(arch), None
    mean, std = IMAGENET_GREY if pretrained else (0.2, 0.25)
    path = folder / f"{arch}-{size}.pt"
    save_model_file(path, net, {
        "name": f"bench-{arch}", "version": "0", "architecture": arch, "input_size": int(size),
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": mean, "std": std}, "tta": True,
        "weights": "imagenet" if pretrained else "random"})
    return path


class OvBf16Runner(OvRunner):
    """The serving engine's OpenVINO runner compiled in bf16 instead of f32: measured only, to
    show what its speed costs in logits (never served)."""

    compile_config = {**OvRunner.compile_config, "INFERENCE_PRECISION_HINT": "bf16"}


def val_batch(size: int, n: int) -> np.ndarray:
    from fracture_node.images import letterbox

    val = split_records(load_records(SHARED / "datasets" / "fracture-xr"), "val")
    return np.stack([letterbox(load_image_file(r.path), size) for r in val[:n]])


def rate(fn: Callable[[], Any], n_images: int, seconds: float) -> float:
    fn()  # warm-up
    runs, started = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and runs >= 2:
            return runs * n_images / elapsed


def in_passes(clf: Classifier, fn: Callable[[np.ndarray], Any], batch: np.ndarray
              ) -> Callable[[], Any]:
    """``fn`` on the batch in the classifier's passes (:meth:`Classifier.in_passes`)."""
    return lambda: clf.in_passes(batch, fn) or fn(batch)


def torch_forward(net: torch.nn.Module, clf: Classifier, tta: bool,
                  channels_last: bool) -> Callable[[np.ndarray], Any]:
    def run(batch: np.ndarray) -> Any:
        x = (torch.from_numpy(batch)[:, None] - clf._mean) / clf._std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = net(x).squeeze(1)
            if tta:
                logits = (logits + net(torch.flip(x, dims=[3])).squeeze(1)) / 2
        return logits
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    p.add_argument("--build", default=None, metavar="ARCH:SIZE",
                   help="build a model file instead, e.g. efficientnet_lite0:384")
    p.add_argument("--batch", type=int, default=16, help="the serving batch size")
    p.add_argument("--sub-batch", type=int, default=CPU_SUB_BATCH,
                   help="images per pass of the network ([model] sub_batch on a CPU; 0: the "
                        "whole batch in one pass)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    p.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    p.add_argument("--compile", action="store_true", help="also torch.compile")
    p.add_argument("--engines", default="torch,torch_cl,onnxruntime,openvino,openvino_bf16",
                   help="openvino*: measured only where the openvino package imports")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fn-engines-"))
    if args.build:
        model = build(args.build, tmp)
    else:  # a copy, so that the graph is not written beside the bundled model
        source = args.model or bundled_model_path()
        model = tmp / source.name
        model.write_bytes(source.read_bytes())
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    export_onnx(model)
    export_s = time.perf_counter() - t0
    ref = Classifier.load(model, "cpu", engine="torch", threads=args.threads)
    ort = Classifier.load(model, "cpu", engine="onnxruntime", threads=args.threads,
                          saliency=("hirescam", "last"))
    batch = val_batch(ref.input_size, args.batch)
    ref.sub_batch = ort.sub_batch = args.sub_batch
    engines = args.engines.split(",") + (["torch_compile"] if args.compile else [])
    ov_runners: dict[str, OvRunner] = {}
    for engine in [e for e in engines if e.startswith("openvino")]:
        if not ov_available():
            print(json.dumps({"benchmark": "engines", "engine": engine,
                              "skipped": "the openvino package is not installed"}), flush=True)
            engines.remove(engine)
            continue
        runner_class = OvBf16Runner if engine.endswith("bf16") else OvRunner
        ov_runners[engine] = runner_class(onnx_path_for(model), args.threads)
    results: dict[str, dict[str, float]] = {}
    common = {"model": ref.name, "architecture": ref.card["architecture"],
              "weights": ref.card.get("weights", "trained"), "model_sha256": ref.sha256[:12],
              "input_size": ref.input_size, "batch": args.batch, "sub_batch": args.sub_batch,
              "threads": args.threads or "default"}
    nets: dict[str, Any] = {"torch_cl": ref._net}
    if "torch" in engines:
        nets["torch"] = Classifier.load(model, "cpu")._net.to(
            memory_format=torch.contiguous_format)
    if "torch_compile" in engines:
        nets["torch_compile"] = torch.compile(ref._net)
    for engine in engines:
        results[engine] = {}
        for mode, tta, saliency in MODES:
            fn: Callable[[], Any]
            clf = ort if engine == "onnxruntime" else ref
            clf.tta = tta
            if engine in ov_runners:
                fn = in_passes(ref, functools.partial(ov_runners[engine].run, tta=tta,
                                                      evidence=saliency), batch)
            elif engine == "onnxruntime":
                if saliency:
                    fn = functools.partial(Explainer(ort, "hirescam", "last").explain_batch,
                                           batch)
                else:
                    fn = lambda: ort.predict_batch(batch)  # noqa: E731
            elif saliency:
                if engine != "torch_cl":
                    continue  # the explainer runs the classifier's (channels-last) network
                fn = functools.partial(Explainer(ref, "hirescam", "last").explain_batch, batch)
            else:
                fn = in_passes(ref, torch_forward(nets[engine], ref, tta, engine != "torch"),
                               batch)
            started = time.perf_counter()
            value = rate(fn, len(batch), args.seconds)
            results[engine][mode] = round(value, 2)
            print(json.dumps({"benchmark": "engines", "engine": engine, "mode": mode,
                              "images_per_s": round(value, 2),
                              "wall_s": round(time.perf_counter() - started, 1), **common}),
                  flush=True)
    ref.tta = ort.tta = True
    with torch.inference_mode():
        x = (torch.from_numpy(batch)[:, None] - ref._mean) / ref._std
        torch_logits = ((ref._net(x) + ref._net(torch.flip(x, dims=[3]))) / 2).squeeze(1)
    ort_logits, _ = ort._runner.run(batch, True, evidence=False)  # type: ignore[union-attr]
    differences = {name: float(np.max(np.abs(r.run(batch, True, False)[0] - torch_logits.numpy())))
                   for name, r in ov_runners.items()}
    def ratios(engine: str, to: str) -> dict[str, float]:
        """images/s of ``engine`` over ``to``'s, per mode both measured."""
        num, den = results.get(engine, {}), results.get(to, {})
        return {mode: round(num[mode] / den[mode], 2) for mode in num if mode in den}

    summary = {
        "benchmark": "engines_summary", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs {cpu_name()}",
        "load_average": round(os.getloadavg()[0], 2), "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__, "export_s": round(export_s, 1),
        **common, "images_per_s": results,
        "ratio_onnxruntime_to_torch_cl": ratios("onnxruntime", "torch_cl"),
        "max_abs_logit_difference": float(np.max(np.abs(
            ort_logits - torch_logits.numpy()))),
        **({"openvino": __import__("openvino").__version__,
            "ratio_openvino_to_torch_cl": {name: ratios(name, "torch_cl") for name in ov_runners},
            "ratio_openvino_to_onnxruntime": {name: ratios(name, "onnxruntime")
                                              for name in ov_runners},
            "max_abs_logit_difference_openvino": differences} if ov_runners else {}),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
