"""The ``fracture-node`` console entry: re-executes ``train`` under jemalloc, then runs the command.

The allocator choice itself (which commands, which library, the ``FRACTURE_NODE_ALLOCATOR``
override) is :mod:`fracture_node.allocator`; here is only the re-execution, which must happen
before anything else is imported.
"""

from __future__ import annotations

import os
import sys

from fracture_node.allocator import preload_env


def main() -> int:
    argv = sys.argv[1:]
    env = preload_env(argv, os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "fracture_node", *argv], env)
    from fracture_node.cli.commands import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
