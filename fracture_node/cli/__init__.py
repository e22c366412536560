"""The programs: every module that owns an argument parser, apart from the library.

``launcher`` is the console entry (``fracture-node``), ``commands`` the top-level parser and the
node's own subcommands, ``operations`` audit/status/housekeeping, ``predict`` (with
``predict_saliency``), ``train`` and ``evaluate`` the offline ones. Nothing in the library imports
this package (an import-linter contract in pyproject.toml, docs/architecture.md).
"""

from __future__ import annotations

from fracture_node.cli.commands import main

__all__ = ["main"]
