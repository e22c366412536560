"""The command line: version, help, check-config, db upgrade, retry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fracture_node import __version__
from fracture_node.cli import main

BIN = Path(sys.executable).with_name("fracture-node")


def test_version_is_printed() -> None:
    """`fracture-node --version` prints the package version."""
    out = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_check_config_reports_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """check-config exits 2 and names the bad key."""
    bad = tmp_path / "c.toml"
    bad.write_text("[node]\nport = 'x'\n")
    assert main(["check-config", str(bad)]) == 2
    assert "[node] port" in capsys.readouterr().err


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example configuration is valid."""
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    assert main(["check-config", str(example)]) == 0


def test_db_upgrade_creates_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """`db upgrade` takes an empty database to the head revision, `db current` shows it."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["db", "upgrade", "--url", url]) == 0
    assert "-> 0" in capsys.readouterr().out
    assert main(["db", "current", "--url", url]) == 0
    assert capsys.readouterr().out.strip().startswith("0")


def test_retry_requeues_dead_deliveries(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    """`retry` puts dead-lettered deliveries back to pending."""
    import datetime as dt

    from fracture_node.db import migrate
    from fracture_node.db import schema as s
    from fracture_node.db.store import Store

    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate.upgrade(url)
    store = Store(url)
    now = dt.datetime.now(dt.UTC)

    def add_dead_delivery(ses: Any) -> None:
        report = s.Report(study_instance_uid="1.2", version=1, sop_instance_uid="1.2.3",
                          series_instance_uid="1.2.4", path="x.dcm", created_at=now,
                          instances_total=1, instances_positive=0, instances_unprocessed=0,
                          made_by="t")
        ses.add(report)
        ses.flush()
        ses.add(s.Delivery(report_id=report.id, destination="pacs", state=s.DEAD, attempts=5,
                           created_at=now, next_attempt_at=now, deadline_at=now))

    store.run(add_dead_delivery)
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    assert main(["retry", "--config", str(config)]) == 0
    assert "1 dead-lettered" in capsys.readouterr().out
    [delivery] = store.rows(s.Delivery)
    assert delivery.state == s.PENDING and delivery.deadline_at > now
    store.dispose()


def test_metrics_port_override() -> None:
    """--metrics-port replaces [metrics] port without touching the rest."""
    from fracture_node import config as cfg

    base = cfg.load(None, environ={})
    changed = cfg.with_metrics_port(base, 9999)
    assert changed.metrics.port == 9999 and changed.node == base.node
