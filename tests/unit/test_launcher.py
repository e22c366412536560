"""The console entry's allocator choice (fracture_node/allocator.py, run by cli/launcher.py)."""

from __future__ import annotations

import pytest

from fracture_node.allocator import MALLOC_CONF, allocator_name, preload_env

LIB = "libjemalloc.so.2"


def found() -> str:  # the loader finds jemalloc
    return LIB


def test_train_preloads_jemalloc() -> None:
    env = preload_env(["train", "--x"], {"PATH": "/usr/bin"}, found)
    assert env is not None
    assert env["LD_PRELOAD"] == LIB
    assert env["MALLOC_CONF"] == MALLOC_CONF
    assert env["PATH"] == "/usr/bin"


@pytest.mark.parametrize("argv", [[], ["serve"], ["predict", "x.png"], ["evaluate"],
                                  ["echo", "h", "1"], ["audit", "positives"], ["--version"],
                                  ["db", "upgrade"], ["status"]])
def test_other_commands_run_as_they_are(argv: list[str]) -> None:
    assert preload_env(argv, {}, found) is None


def test_an_operators_preload_and_malloc_conf_are_kept() -> None:
    env = preload_env(["train"], {"LD_PRELOAD": "/opt/x/libaudit.so", "MALLOC_CONF": "narenas:2"},
                      found)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB} /opt/x/libaudit.so"
    assert env["MALLOC_CONF"] == "narenas:2"


def test_no_reexec_when_preloaded_absent_or_declined() -> None:
    # The re-executed process itself (or an operator's own jemalloc) does not loop.
    assert preload_env(["train"], {"LD_PRELOAD": f"/usr/lib/{LIB}"}, found) is None
    assert preload_env(["train"], {}, lambda: None) is None  # the host has no jemalloc
    assert preload_env(["train"], {"FRACTURE_NODE_ALLOCATOR": "System"}, found) is None


def test_an_unknown_allocator_is_refused_clearly() -> None:
    with pytest.raises(SystemExit, match="FRACTURE_NODE_ALLOCATOR must be 'jemalloc' or 'system'"):
        preload_env(["train"], {"FRACTURE_NODE_ALLOCATOR": "tcmalloc"}, found)


def test_allocator_name_reads_this_process() -> None:
    # pytest runs on the system allocator (it is not started through the console entry).
    assert allocator_name() == "system"
