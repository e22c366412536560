"""`fracture-node train` as a process runs on jemalloc (setup.sh --test installs libjemalloc2)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.serve import BIN


def _train(tmp_path: Path, dataset_dir: Path, env: dict[str, str]) -> str:
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN), "train", "--data", str(dataset_dir), "--arch", "mobilenet_v3_small",
         "--input-size", "64", "--epochs", "1", "--batch-size", "8", "--limit", "16",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "1",
         "--device", "cpu", "--no-calibrate"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "fracture-model.pt").is_file()
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(("env", "allocator"), [
    ({}, "jemalloc"),
    ({"FRACTURE_NODE_ALLOCATOR": "system"}, "system"),
])
def test_train_runs_on_the_chosen_allocator(tmp_path: Path, dataset_dir: Path,
                                            env: dict[str, str], allocator: str) -> None:
    """The console entry re-executes `train` under jemalloc (read from the process's own memory
    map, not from its environment) unless FRACTURE_NODE_ALLOCATOR=system."""
    log = _train(tmp_path, dataset_dir, env)
    assert f'"allocator": "{allocator}"' in log
