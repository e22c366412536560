#!/usr/bin/env bash
# Set everything up and run fracture-node on its embedded defaults:
# SQLite and the spool under ./var, the bundled model, DICOM port 11112, AE title FRACTURE_NODE.
# Extra arguments go to `fracture-node serve` (e.g. ./run.sh --config my.toml).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/fracture-node serve "$@"
