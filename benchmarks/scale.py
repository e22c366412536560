"""Scale-out throughput: one receiver and N worker processes on one PostgreSQL, as JSON.

Usage::

    .venv/bin/python benchmarks/scale.py [--workers 1,2,4] [--studies 50] [--per-study 10]
        [--model PATH | --tiny]

For each N a fresh PostgreSQL database (127.0.0.1:5432, trust auth, as the tests use) and a
fresh shared spool are made; ``fracture-node serve --role receiver`` and N ``--role worker``
processes start on one configuration; once every node has started, pynetdicom pushes the same
workload (``--studies`` studies of ``--per-study`` 64x64 CR images, over 5 successive
associations; the spool with ``fsync = true``, as in production). The
figure is ``instances_per_s``: instances / (last ``results.created_at`` - first
``instances.received_at``), i.e. from the first stored object to the last result. Also printed:
the receive rate alone, the reports made, how the results split over the workers, the mean batch.

The model is the bundled one (``fracture_node/models/fracture-model.pt``) when present, else a
tiny untrained mobilenet_v3_small at 64 px (the tests' model; ``--tiny`` forces it, to see what
the pipeline costs without the model); the JSON says which. Every node runs on the CPU here
(``device = "cpu"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fracture_node.db import schema as s  # noqa: E402
from fracture_node.ml.infer import bundled_model_path  # noqa: E402
from tests.e2e.test_scale import Cluster, make_studies, push, wait_until  # noqa: E402
from tests.support import postgres_database  # noqa: E402


def tiny_model(folder: Path) -> Path:
    from fracture_node.ml.model import build_model, save_model_file

    path = folder / "tiny.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), {
        "name": "tiny-test-model", "version": "0.0", "architecture": "mobilenet_v3_small",
        "input_size": 64, "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.5, "std": 0.25},
    })
    return path


def run_once(workers: int, model: Path, studies: list[Any], tmp: Path) -> dict[str, Any]:
    n = sum(len(study) for study in studies)
    with postgres_database() as url:
        cluster = Cluster(tmp / f"workers-{workers}", url, model, None, claim_timeout_s=60.0,
                          max_attempts=3, stable_after_s=1.0, fsync=True)
        try:
            nodes = [cluster.start("receiver")] + [cluster.start("worker")
                                                   for _ in range(workers)]
            for node in nodes:
                node.wait_started(timeout=300)
            started = time.monotonic()
            push(cluster.port, [ds for study in studies for ds in study], associations=5)
            push_s = time.monotonic() - started
            store = cluster.store
            wait_until(lambda: sum(v for k, v in store.instance_states().items()
                                   if k in s.FINAL_INSTANCE_STATES) >= n, 1800,
                       "every instance finished", interval=0.5)
            instances = store.rows(s.Instance)
            results = store.rows(s.Result)
            first = min(i.received_at for i in instances)
            last = max(r.created_at for r in results)
            elapsed = (last - first).total_seconds()
            per_worker: dict[str, int] = {}
            for r in results:
                per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
            wait_until(lambda: not any(st.report_due for st in store.rows(s.Study)), 120,
                       "every study reported", interval=0.5)
            reports = len(store.rows(s.Report))
            for node in nodes:
                node.stop(signal.SIGTERM, timeout=120)
            return {
                "workers": workers,
                "instances": n,
                "results": len(results),
                "seconds_first_stored_to_last_result": round(elapsed, 2),
                "instances_per_s": round(len(results) / elapsed, 2) if elapsed > 0 else None,
                "receive_instances_per_s": round(n / push_s, 2),
                "reports": reports,
                "results_per_worker": sorted(per_worker.values(), reverse=True),
                "mean_batch": round(sum(r.batch_size for r in results) / len(results), 2),
            }
        finally:
            cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fn-scale-"))
    if args.model:
        model, which = args.model.resolve(), f"given: {args.model}"
    elif bundled_model_path().is_file() and not args.tiny:
        model, which = bundled_model_path(), "bundled (fracture_node/models/fracture-model.pt)"
    else:
        model = tiny_model(tmp)
        which = "tiny untrained mobilenet_v3_small, 64 px" + ("" if args.tiny else
                                                              " (no bundled model)")
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    studies = make_studies(args.studies, args.per_study)
    runs = [run_once(int(w), model, studies, tmp) for w in args.workers.split(",")]
    print(json.dumps({
        "benchmark": "scale",
        "model": which,
        "architecture": card.get("architecture"),
        "input_size": card.get("input_size"),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "runs": runs,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
