"""The JSON API against a node that received real studies, on SQLite and PostgreSQL: its answers
are the audit and status commands' answers, its filters and paging hold, its actions are for the
operator only and recorded with who asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from fracture_node.cli import operations as audit_cli
from fracture_node.db import migrate
from fracture_node.db import schema as s
from fracture_node.web.server import HttpServer
from tests.support import postgres_database, storescp_running
from tests.support.node import Node
from tests.support.web import basic, login, serving, web_config
from tests.support.web_node import (
    ACCESSION,
    PATIENT_ID,
    PATIENT_NAME,
    Studies,
    populate,
    populated_config,
)


@dataclass
class Site:
    node: Node
    studies: Studies
    server: HttpServer
    client: httpx.Client
    config_file: Path

    def get(self, path: str, user: str = "vera", **params: Any) -> Any:
        answer = self.client.get(path, auth=basic(user), params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
        capsys.readouterr()
        assert audit_cli.main([*argv, "--config", str(self.config_file), "--json"]) == 0
        return json.loads(capsys.readouterr().out)


def _site(state: Path, url: str, model: Path, samples_dir: Path, **http: Any) -> Iterator[Site]:
    migrate.upgrade(url)
    with storescp_running(state / "pacs") as pacs_port:
        config = web_config(state, populated_config(state, url, model, pacs_port), **http)
        node = Node(config, model)
        try:
            studies = populate(node, samples_dir)
            config_file = state / "config.toml"
            config_file.write_text(f'[database]\nurl = "{url}"\n')
            with serving(config, node.store) as server, \
                    httpx.Client(base_url=server.url) as client:
                yield Site(node, studies, server, client, config_file)
        finally:
            node.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         saliency_model: Path, samples_dir: Path) -> Iterator[Site]:
    """A populated node and its HTTP server, read-only tests only (one per backend)."""
    state = tmp_path_factory.mktemp(f"web-{request.param}")
    if request.param == "sqlite":
        yield from _site(state, f"sqlite:///{state / 'node.db'}", saliency_model, samples_dir)
    else:
        with postgres_database() as url:
            yield from _site(state, url, saliency_model, samples_dir)


@pytest.fixture(params=["sqlite", "postgres"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path, saliency_model: Path,
          samples_dir: Path) -> Iterator[Site]:
    """A populated node of its own, for a test that changes state."""
    if request.param == "sqlite":
        yield from _site(tmp_path, f"sqlite:///{tmp_path / 'node.db'}", saliency_model,
                         samples_dir)
    else:
        with postgres_database() as url:
            yield from _site(tmp_path, url, saliency_model, samples_dir)


def _without(state: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in keys}


# Same answers as the commands -----------------------------------------------------------------

def test_status_is_the_status_commands_answer(site: Site,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """/api/status equals `fracture-node status --json` (but the clock-dependent fields)."""
    api = site.get("/api/status")
    cli = site.cli(capsys, "status")
    clock = ("at", "oldest_unreported_study_seconds")
    assert _without(api, *clock) == _without(cli, *clock)
    assert api["queue_depth"] == 1 and api["dead_deliveries"] == 1


@pytest.mark.parametrize("question", ["deliveries", "objects", "unprocessed", "reports_failed",
                                      "models", "positives"])
def test_audit_question_is_the_audit_commands_answer(site: Site, question: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """/api/audit/QUESTION equals `fracture-node audit QUESTION --json` for the same window."""
    window = {"since": "2020-01-01", "until": "2099-12-31"}
    api = site.get(f"/api/audit/{question}", **window)
    cli = site.cli(capsys, "audit", question, "--since", window["since"],
                   "--until", window["until"])
    assert api == cli
    assert api["rows"], "the populated node answers every one of these questions"


def test_dead_letters_are_the_dead_rows_of_audit_deliveries(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """/api/dead-letters lists exactly the deliveries `audit deliveries` shows as dead."""
    cli = site.cli(capsys, "audit", "deliveries", "--since", "2020-01-01")
    dead = {r["delivery_id"] for r in cli["rows"] if r["state"] == "dead"}
    api = site.get("/api/dead-letters")
    assert {i["delivery_id"] for i in api["items"]} == dead and api["total"] == len(dead) == 1
    [item] = api["items"]
    assert item["destination"] == "down" and item["last_error"]


def test_models_are_the_audit_models_answer(site: Site,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """/api/models (all time) lists the model that served, as `audit models` does."""
    cli = site.cli(capsys, "audit", "models", "--since", "1970-01-01")
    assert site.get("/api/models") == cli["rows"]
    assert [m["model_name"] for m in cli["rows"]] == ["saliency-test-model"]


def test_queue_lists_what_status_counts(site: Site) -> None:
    """/api/queue holds the queued instance that status counts, of the waiting study."""
    queue = site.get("/api/queue")
    assert queue["total"] == site.get("/api/status")["queue_depth"] == 1
    assert queue["items"][0]["study_instance_uid"] == site.studies.waiting


# Studies, filters, paging ---------------------------------------------------------------------

def test_studies_carry_their_state(site: Site) -> None:
    """Each study of the node is listed once, with the state it is in."""
    items = site.get("/api/studies")["items"]
    st = site.studies
    assert {i["study_instance_uid"]: i["state"] for i in items} == {
        st.reported: "reported", st.not_assessed: "not_assessed", st.parked: "parked",
        st.waiting: "waiting"}


def test_studies_filter_by_state(site: Site) -> None:
    """state=parked lists the parked study only."""
    page = site.get("/api/studies", state="parked")
    assert [i["study_instance_uid"] for i in page["items"]] == [site.studies.parked]
    assert page["total"] == 1


def test_studies_filter_by_destination_and_delivery_state(site: Site) -> None:
    """destination=down with delivery_state=dead lists the study whose delivery there died."""
    page = site.get("/api/studies", destination="down", delivery_state="dead")
    assert [i["study_instance_uid"] for i in page["items"]] == [site.studies.reported]
    assert page["items"][0]["deliveries"] == {"down": "dead", "pacs": "delivered"}
    assert site.get("/api/studies", destination="pacs", delivery_state="dead")["total"] == 0


def test_studies_filter_by_date(site: Site) -> None:
    """A window that ends before today holds no study; one that includes today holds all."""
    assert site.get("/api/studies", until="2020-01-01")["total"] == 0
    assert site.get("/api/studies", since="2020-01-01")["total"] == 4


def test_studies_page_without_gaps_or_repeats(site: Site) -> None:
    """Two pages of two cover the four studies exactly once, with the total on each."""
    first = site.get("/api/studies", limit=2, offset=0)
    second = site.get("/api/studies", limit=2, offset=2)
    uids = [i["study_instance_uid"] for i in first["items"] + second["items"]]
    assert first["total"] == second["total"] == 4
    assert len(uids) == len(set(uids)) == 4


def test_bad_filter_is_a_clear_422(site: Site) -> None:
    """An unknown state or a since that is not a date is refused with 422 naming it."""
    bad = site.client.get("/api/studies", params={"state": "lost"}, auth=basic("vera"))
    assert bad.status_code == 422 and "state" in bad.text
    bad = site.client.get("/api/studies", params={"since": "yesterday"}, auth=basic("vera"))
    assert bad.status_code == 422 and "since" in bad.text


def test_study_has_every_image_report_and_attempt(site: Site) -> None:
    """A study's answer has each image's probability, the report and each delivery's attempts."""
    study = site.get(f"/api/studies/{site.studies.reported}")
    assert [i["state"] for i in study["instances"]] == ["processed", "processed"]
    assert all(0.0 <= i["probability"] <= 1.0 for i in study["instances"])
    [report] = study["reports"]
    assert report["version"] == 1
    by_dest = {d["destination"]: d for d in report["deliveries"]}
    assert by_dest["pacs"]["state"] == "delivered" and by_dest["down"]["state"] == "dead"
    assert [a["ok"] for a in by_dest["pacs"]["attempts_made"]] == [True]
    assert [a["ok"] for a in by_dest["down"]["attempts_made"]] == [False]


def test_not_processed_instance_has_its_reason(site: Site) -> None:
    """The out-of-scope CT is listed not_processed with its reason."""
    [inst] = site.get(f"/api/studies/{site.studies.not_assessed}")["instances"]
    assert inst["state"] == "not_processed" and inst["reason"]


def test_study_shows_accession_but_no_patient_data_by_default(site: Site) -> None:
    """By default a study shows UIDs and the accession number, never the patient's name or ID."""
    answer = site.client.get(f"/api/studies/{site.studies.reported}", auth=basic("vera"))
    assert answer.json()["accession_number"] == ACCESSION
    assert PATIENT_ID not in answer.text and "Secretname" not in answer.text
    assert "patient" not in answer.json()


def test_unknown_study_is_404(site: Site) -> None:
    """A Study Instance UID the node never received answers 404."""
    assert site.client.get("/api/studies/1.2.3.4", auth=basic("vera")).status_code == 404


def test_overlay_is_a_png_of_the_image(site: Site) -> None:
    """An image with a saliency record has an overlay PNG; one without answers 404."""
    st = site.studies
    answer = site.client.get(f"/api/studies/{st.reported}/instances/{st.hip_sop_uid}/overlay.png",
                             auth=basic("vera"))
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    [ct] = site.get(f"/api/studies/{st.not_assessed}")["instances"]
    missing = site.client.get(
        f"/api/studies/{st.not_assessed}/instances/{ct['sop_instance_uid']}/overlay.png",
        auth=basic("vera"))
    assert missing.status_code == 404


def test_destinations_have_last_success_and_failure(site: Site) -> None:
    """pacs has a last success and no failure; down a last failure with its error."""
    dests = {d["name"]: d for d in site.get("/api/destinations")}
    assert dests["pacs"]["last_success_at"] and dests["pacs"]["last_failure_at"] is None
    assert dests["down"]["last_success_at"] is None and dests["down"]["last_failure_error"]
    assert dests["down"]["deliveries"] == {"pending": 0, "delivered": 0, "dead": 1}


def test_openapi_describes_the_api(site: Site) -> None:
    """The node serves its OpenAPI description, naming the reads and the actions."""
    paths = site.client.get("/openapi.json").json()["paths"]
    assert {"/api/studies", "/api/studies/{study_uid}", "/api/dead-letters",
            "/api/deliveries/{delivery_id}/retry", "/api/studies/{study_uid}/reprocess"} \
        <= set(paths)
    assert "post" in paths["/api/deliveries/{delivery_id}/retry"]


def test_viewer_may_not_retry(site: Site) -> None:
    """A viewer's retry is refused with 403, the delivery stays dead and nothing is recorded."""
    [dead] = site.get("/api/dead-letters")["items"]
    answer = site.client.post(f"/api/deliveries/{dead['delivery_id']}/retry", auth=basic("vera"))
    assert answer.status_code == 403
    assert site.get("/api/dead-letters")["total"] == 1
    assert site.node.store.rows(s.OperatorAction) == []


# Actions (each on a node of its own) ---------------------------------------------------------

def test_operator_retry_queues_the_dead_delivery_and_records_who(
        fresh: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator's retry makes the dead delivery pending and `audit actions` names the user."""
    [dead] = fresh.get("/api/dead-letters")["items"]
    answer = fresh.client.post(f"/api/deliveries/{dead['delivery_id']}/retry",
                               auth=basic("otto"))
    assert answer.status_code == 200
    [delivery] = fresh.node.store.rows(s.Delivery, s.Delivery.id == dead["delivery_id"])
    assert delivery.state == s.PENDING
    [row] = fresh.cli(capsys, "audit", "actions", "--since", "2020-01-01")["rows"]
    assert (row["user_name"], row["role"], row["via"], row["action"], row["target"],
            row["affected"]) == ("otto", "operator", "basic", "retry_delivery",
                                 str(dead["delivery_id"]), 1)


def test_retry_of_a_delivery_that_is_not_dead_is_409(fresh: Site) -> None:
    """Retrying a delivered delivery changes nothing and answers 409 (the ask is recorded)."""
    study = fresh.get(f"/api/studies/{fresh.studies.reported}")
    delivered = next(d for d in study["reports"][0]["deliveries"] if d["state"] == "delivered")
    answer = fresh.client.post(f"/api/deliveries/{delivered['delivery_id']}/retry",
                               auth=basic("otto"))
    assert answer.status_code == 409
    [row] = fresh.node.store.rows(s.OperatorAction)
    assert row.affected == 0


def test_operator_reprocess_takes_the_parked_study_back(fresh: Site) -> None:
    """Re-processing the parked study makes its report due again, recorded with the user."""
    answer = fresh.client.post(f"/api/studies/{fresh.studies.parked}/reprocess",
                               auth=basic("otto"))
    assert answer.status_code == 200
    assert fresh.get("/api/studies", state="parked")["total"] == 0
    [row] = fresh.node.store.rows(s.OperatorAction)
    assert (row.action, row.target, row.user_name) == ("reprocess_study", fresh.studies.parked,
                                                       "otto")


def test_patient_data_shown_only_when_allowed_and_recorded(
        tmp_path: Path, saliency_model: Path, samples_dir: Path) -> None:
    """With show_patient_data the study shows name and ID; the view is recorded and logged
    without them."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    for site in _site(tmp_path, url, saliency_model, samples_dir, show_patient_data=True):
        with capture_logs() as logs:
            study = site.get(f"/api/studies/{site.studies.reported}")
        assert study["patient"] == {"name": PATIENT_NAME, "id": PATIENT_ID}
        [row] = site.node.store.rows(s.OperatorAction)
        assert (row.action, row.target, row.user_name) == (
            "view_patient_data", site.studies.reported, "vera")
        shown = [e for e in logs if e["event"] == "patient_data_shown"]
        assert shown and PATIENT_ID not in repr(logs) and "Secretname" not in repr(logs)


def test_console_offers_reprocess_to_the_operator_only(site: Site) -> None:
    """The parked study's page has the re-process button for the operator, not for the viewer."""
    pages = {}
    for name in ("vera", "otto"):
        with httpx.Client(base_url=site.server.url) as browser:
            assert login(browser, name).status_code == 303
            pages[name] = browser.get(f"/studies/{site.studies.parked}",
                                      headers={"Accept": "text/html"}).text
    assert 'id="reprocess"' in pages["otto"] and 'id="reprocess"' not in pages["vera"]
    assert "ReportError: simulated failure" in pages["vera"]
