#!/usr/bin/env bash
# Set everything up (Python environment, DCMTK, dicom3tools, Orthanc, PostgreSQL) and run the
# whole test suite. Extra arguments go to pytest (e.g. ./test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
.venv/bin/ruff check fracture_node tests benchmarks
exec .venv/bin/pytest "$@"
