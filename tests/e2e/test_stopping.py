"""Starting and stopping ``fracture-node serve`` as a real process: bounded, and loud when it fails.

Stopping while the worker scores and reports are being made must end within
``[node] stop_timeout_s`` with exit code 0; a port already taken must end start-up before the
model loads and before anything is received, with one JSON event naming the port and exit 1.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import BIN, ServeProcess, make_study, wait_until

CR = "CR_cspine_tiny16x16_explicitVR.dcm"


def _events(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _run_failing(serve: ServeProcess, timeout: float = 120) -> tuple[int, float]:
    """Run ``serve`` until it exits by itself; its exit code and seconds taken."""
    start = time.monotonic()
    with serve.log_path.open("ab") as log:
        proc = subprocess.run([str(BIN), "serve", "--config", str(serve.config)],
                              cwd=serve.workdir, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc.returncode, time.monotonic() - start


def test_sigterm_while_scoring_and_reporting_exits_in_bounded_time(
        tmp_path: Path, storescp: tuple[int, Path], tiny_model: Path,
        samples_dir: Path) -> None:
    """SIGTERM while studies keep arriving, are scored and reported: exit 0 within 20 s, with
    node_stopped as the last event."""
    serve = ServeProcess(tmp_path / "node", [("pacs", "PACS", storescp[0])], model=tiny_model,
                         extra="")
    serve.config.write_text(serve.config.read_text().replace(
        "[study]\nstable_after_s = 1.0", "[study]\nstable_after_s = 0.0")
        .replace('[node]\n', '[node]\nstop_timeout_s = 10.0\n'))
    serve.start()
    pushing = threading.Event()
    pushing.set()

    def push() -> None:
        i = 0
        while pushing.is_set():
            files = make_study(samples_dir, tmp_path / f"study{i}", [CR] * 3)
            subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(serve.port),
                            *map(str, files)], capture_output=True, timeout=60)
            i += 1

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        wait_until(lambda: serve.log().count('"report_created"') >= 2, timeout=120)
        assert serve.proc is not None
        start = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(timeout=60)
        took = time.monotonic() - start
    finally:
        pushing.clear()
        if serve.proc is not None and serve.proc.poll() is None:
            serve.proc.kill()
    print(f"\nSIGTERM to exit while scoring and reporting: {took:.1f} s")
    assert code == 0
    assert took < 20.0, took
    events = _events(serve.log())
    assert events[-1]["event"] == "node_stopped"
    assert {"signal_received", "node_stopping", "worker_stopped"} <= {e["event"] for e in events}


def _taken(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("which", ["metrics", "dicom"])
def test_port_taken_ends_start_up_with_one_event_and_exit_1(
        tmp_path: Path, tiny_model: Path, which: str) -> None:
    """A taken port (metrics or DICOM) ends start-up promptly, before the model loads, with one
    node_start_failed event naming the port, exit code 1 and no traceback."""
    holder = _taken()
    port = holder.getsockname()[1]
    serve = ServeProcess(tmp_path / "node", [], model=tiny_model)
    text = serve.config.read_text()
    if which == "metrics":
        text = text.replace(f"port = {serve.metrics_port}", f"port = {port}")
    else:
        text = text.replace(f"port = {serve.port}", f"port = {port}")
    serve.config.write_text(text)
    try:
        code, took = _run_failing(serve)
    finally:
        holder.close()
    log = serve.log()
    assert code == 1, log[-3000:]
    assert "Traceback" not in log
    events = _events(log)
    failed = [e for e in events if e["event"] == "node_start_failed"]
    assert len(failed) == 1
    assert failed[0]["part"] == f"{which}_port"
    assert f"127.0.0.1:{port}" in failed[0]["error"] and "in use" in failed[0]["error"]
    names = [e["event"] for e in events]
    assert "model_loaded" not in names and "scp_listening" not in names
    assert names[-1] == "node_stopped"
    print(f"\n{which} port taken: exit 1 after {took:.1f} s")
    assert took < 60, took


def test_metrics_port_taken_while_a_sender_pushes_stores_nothing(
        tmp_path: Path, tiny_model: Path, samples_dir: Path) -> None:
    """With the metrics port taken and storescu pushing at the DICOM port during start-up, the
    node stores nothing and accepts no association before it exits 1."""
    holder = _taken()
    serve = ServeProcess(tmp_path / "node", [], model=tiny_model)
    serve.config.write_text(serve.config.read_text().replace(
        f"port = {serve.metrics_port}", f"port = {holder.getsockname()[1]}"))
    files = make_study(samples_dir, tmp_path / "study", [CR])
    results: list[int] = []
    stop = threading.Event()

    def push() -> None:
        while not stop.is_set():
            proc = subprocess.run(["storescu", "-to", "2", "-ta", "2", "-aec", "FRACTURE_NODE",
                                   "127.0.0.1", str(serve.port), str(files[0])],
                                  capture_output=True, timeout=30)
            results.append(proc.returncode)
            time.sleep(0.1)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        code, _ = _run_failing(serve)
    finally:
        stop.set()
        pusher.join(30)
        holder.close()
    assert code == 1
    assert results and all(rc != 0 for rc in results)
    assert not list((serve.workdir / "state").rglob("*.dcm"))
    assert "instance_stored" not in serve.log()


# SIGTERM delivered while the main thread is inside a log write: a Python signal handler runs on
# the main thread between two bytecodes, here while structlog's (non-reentrant) write lock is
# held. A handler that logged, or that set an Event, would wait on that lock for good.
_SIGNAL_INSIDE_A_WRITE = r'''
import os, signal, sys
from fracture_node.cli.commands import main

class SignalInsideAWrite:
    """stdout that raises SIGTERM in the middle of writing the node_started line."""
    def __init__(self, real):
        self.real, self.fired = real, False
    def write(self, text):
        self.real.write(text)
        if not self.fired and "node_started" in text:
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):  # the Python handler runs in here, inside the write lock
                pass
        return len(text)
    def flush(self):
        self.real.flush()
    def isatty(self):
        return False

sys.stdout = SignalInsideAWrite(sys.stdout)
sys.exit(main(["serve", "--config", sys.argv[1]]))
'''


@pytest.mark.parametrize("role", ["receiver", "all"])
def test_sigterm_inside_a_log_write_still_stops_the_node(tmp_path: Path, role: str,
                                                         tiny_model: Path) -> None:
    """A SIGTERM that lands while the main thread writes a log line stops the node (exit 0,
    signal_received and node_stopped logged) instead of hanging it."""
    from tests.support import free_port

    config = tmp_path / "config.toml"
    config.write_text("\n".join([
        "[node]", f'role = "{role}"', f"port = {free_port()}", 'bind_address = "127.0.0.1"',
        'state_dir = "state"', "stop_timeout_s = 20",
        "[metrics]", "enabled = false",
        "[model]", f'path = "{tiny_model}"']) + "\n")
    script = tmp_path / "signal_inside_a_write.py"
    script.write_text(_SIGNAL_INSIDE_A_WRITE)
    try:
        proc = subprocess.run([str(BIN.with_name("python")), str(script), str(config)],
                              cwd=tmp_path, capture_output=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the node hung after a SIGTERM inside a log write:\n"
                             + (exc.stdout or b"").decode(errors="replace")[-3000:]) from None
    out = proc.stdout.decode(errors="replace")
    events = [e["event"] for e in _events(out)]
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode(errors="replace")[-3000:]
    assert events.index("node_started") < events.index("signal_received") \
        < events.index("node_stopped")
