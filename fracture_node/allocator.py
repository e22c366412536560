"""Which memory allocator a process runs on: ``train`` runs on jemalloc when the host has it.

Training on a CPU allocates and frees activation and gradient buffers of tens to hundreds of MB
at every step. glibc's malloc serves blocks that large with ``mmap`` and returns them with
``munmap``, so every step faults its memory in again, page by page: at 576 px a fifth of the CPU
time went to the kernel. jemalloc keeps freed pages for reuse (and, with ``thp:always``, backs
them with transparent huge pages). Measured on a 2-core host with native bf16: 5.6 -> 4.2 s per
576 px step of 32 images over a whole run (docs/benchmarks.md).

Inference is left on glibc: there jemalloc measured 5-10 % slower without huge pages and even
with them (``serve``'s pipeline, docs/benchmarks.md), so only ``train`` changes allocator.

An allocator can only be chosen before the process starts, so ``train`` re-executes itself
once, with ``LD_PRELOAD`` naming the system's jemalloc (Debian/Ubuntu package ``libjemalloc2``);
the process keeps its PID (the console entry, :mod:`fracture_node.cli.launcher`, does it). Without
jemalloc, or with ``FRACTURE_NODE_ALLOCATOR=system``, nothing changes.
"""

from __future__ import annotations

import ctypes.util
from collections.abc import Callable, Mapping, Sequence

REEXEC_COMMANDS = frozenset({"train"})
ALLOCATOR_ENV = "FRACTURE_NODE_ALLOCATOR"
# jemalloc's own thread returns idle pages to the system (instead of the allocating threads);
# huge pages where the kernel allows them on request (THP "madvise", Debian's default).
MALLOC_CONF = "background_thread:true,thp:always,metadata_thp:always"


def find_jemalloc() -> str | None:
    """The shared jemalloc library's name as the dynamic loader finds it, or None."""
    return ctypes.util.find_library("jemalloc")


def preload_env(argv: Sequence[str], environ: Mapping[str, str],
                find_library: Callable[[], str | None] = find_jemalloc) -> dict[str, str] | None:
    """The environment to re-execute ``argv`` with, or None to run as we are.

    None when: the command is not ``train``; the user chose the system allocator; jemalloc is
    already preloaded (we are the re-executed process, or an operator set it); or the host has
    no jemalloc. ``find_library`` (a loader lookup) only runs when the rest says re-execute.
    """
    if not argv or argv[0] not in REEXEC_COMMANDS:
        return None
    choice = environ.get(ALLOCATOR_ENV, "jemalloc").strip().lower()
    if choice == "system":
        return None
    if choice != "jemalloc":
        raise SystemExit(f"fracture-node: {ALLOCATOR_ENV} must be 'jemalloc' or 'system', "
                         f"not {choice!r}")
    preloaded = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preloaded:
        return None
    library = find_library()
    if library is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    return env


def allocator_name() -> str:
    """Which allocator this process runs on, as its memory map shows (for the start-up log)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
    except OSError:
        return "unknown"

