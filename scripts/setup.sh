#!/usr/bin/env bash
# Set up a development/runtime environment in ./.venv (idempotent).
#   scripts/setup.sh          the serving install: enough to run the daemon on the CPU with
#                             OpenVINO (or onnxruntime) and the bundled model's graph, without torch (about
#                             555 MB); with the `torch` extra (the GPU engine) when nvidia-smi
#                             finds a GPU
#   scripts/setup.sh --train  also torch and what training and evaluating need (`train` extra)
#   scripts/setup.sh --test   also the test peers: DCMTK, dicom3tools, Orthanc (+ its DICOMweb
#                             plugin), systemd tools, jemalloc,
#                             PixelMed's SR validator (Java), Chromium (headless, renders the SR),
#                             and a running PostgreSQL (apt; needs root or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "fracture-node needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

if [[ "${1:-}" == "--test" ]]; then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  need=()
  for pair in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc systemd-analyze:systemd; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${pair%%:*} ]] || need+=("${pair##*:}")
  done
  # Orthanc's DICOMweb plugin: the STOW-RS peer of tests/integration/test_stow_*.py.
  [[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
  # jemalloc: `train` runs on it when present (fracture_node/allocator.py).
  ldconfig -p | grep -q 'libjemalloc\.so\.2' || need+=(libjemalloc2)
  # PixelMed's DicomSRValidator checks our SR templates (tests/integration/test_report_validation.py).
  [[ -f /usr/share/java/pixelmed.jar ]] || need+=(libpixelmed-java)
  [[ -f /usr/share/java/commons-codec.jar ]] || need+=(libcommons-codec-java)
  command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
  # Headless Chromium shows dsr2html's rendering of our SR (tests/integration/test_report_rendering.py).
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  # chromedriver: Selenium drives headless Chromium through the web console (tests/e2e/test_console.py).
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
  if ((${#need[@]})); then
    echo "installing ${need[*]} (apt)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # PostgreSQL on 127.0.0.1:5432 for the tests that need it (started if installed but stopped).
  if ! (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    fi
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
case "${1:-}" in
  --test) extra='[test]' ;;
  --train) extra='[train]' ;;
  *) extra=''
     if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
       echo "a GPU is present: installing the torch engine (the torch extra)"
       extra='[torch]'
     fi ;;
esac
.venv/bin/python -m pip install -q -e ".${extra}"
