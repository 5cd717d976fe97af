"""`python -m deploy.grafana provision` against a local fake of the Grafana HTTP API (tests/deploy/fake_grafana.py):
the payloads it sends, and that running it twice changes nothing. (Not run against a live Grafana.)"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaUnauthorizedError

from deploy.grafana.__main__ import main
from deploy.grafana.dashboard import DATASOURCE_UID, load_dashboard
from deploy.grafana.provision import DATASOURCE_NAME, FOLDER_TITLE, FOLDER_UID, ProvisionResult, provision
from tests.deploy.fake_grafana import FakeGrafana

TOKEN = "glsa_test-token"
PROMETHEUS_URL = "http://127.0.0.1:9090"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with FakeGrafana(TOKEN) as server:
        yield server


def api(grafana: FakeGrafana, token: str = TOKEN) -> GrafanaApi:
    return GrafanaApi.from_url(grafana.url, credential=token, timeout=10)


def test_first_run_creates_the_datasource_folder_and_dashboard(grafana: FakeGrafana) -> None:
    dashboard = load_dashboard()
    result = provision(api(grafana), dashboard, PROMETHEUS_URL)
    assert result == ProvisionResult("created", "created", "created", "/d/paged-serve/paged-serve")

    writes = [(call.method, call.path) for call in grafana.state.writes()]
    assert writes == [("POST", "/api/datasources"), ("POST", "/api/folders"), ("POST", "/api/dashboards/db")]
    assert all(call.authorization == f"Bearer {TOKEN}" for call in grafana.state.calls)
    datasource, folder, upload = (call.body for call in grafana.state.writes())
    assert datasource == {
        "uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy",
        "url": PROMETHEUS_URL, "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }  # fmt: skip
    assert folder == {"title": FOLDER_TITLE, "uid": FOLDER_UID}
    assert upload["overwrite"] is True and upload["folderUid"] == FOLDER_UID
    assert upload["dashboard"] == {**dashboard, "id": None}


def test_second_run_changes_nothing(grafana: FakeGrafana) -> None:
    dashboard = load_dashboard()
    provision(api(grafana), dashboard, PROMETHEUS_URL)
    before = copy.deepcopy((grafana.state.datasources, grafana.state.folders, grafana.state.dashboards))
    writes_before = len(grafana.state.writes())

    result = provision(api(grafana), dashboard, PROMETHEUS_URL)
    assert result.datasource == result.folder == result.dashboard == "unchanged"
    assert len(grafana.state.writes()) == writes_before  # only reads the second time
    assert (grafana.state.datasources, grafana.state.folders, grafana.state.dashboards) == before


def test_a_changed_prometheus_url_updates_the_datasource_in_place(grafana: FakeGrafana) -> None:
    dashboard = load_dashboard()
    provision(api(grafana), dashboard, PROMETHEUS_URL)
    result = provision(api(grafana), dashboard, "http://prometheus.monitoring:9090")
    assert (result.datasource, result.folder, result.dashboard) == ("updated", "unchanged", "unchanged")
    update = grafana.state.writes()[-1]
    assert (update.method, update.path) == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")
    assert update.body["url"] == "http://prometheus.monitoring:9090" and update.body["version"] == 1
    assert list(grafana.state.datasources) == [DATASOURCE_UID]  # still one datasource, same uid


def test_a_dashboard_edited_in_grafana_is_overwritten_with_the_file(grafana: FakeGrafana) -> None:
    dashboard = load_dashboard()
    provision(api(grafana), dashboard, PROMETHEUS_URL)
    grafana.state.dashboards["paged-serve"]["dashboard"]["title"] = "edited by hand"
    result = provision(api(grafana), dashboard, PROMETHEUS_URL)
    assert result.dashboard == "updated"
    stored = grafana.state.dashboards["paged-serve"]
    assert stored["dashboard"]["title"] == dashboard["title"] and stored["dashboard"]["version"] == 2
    assert stored["folderUid"] == FOLDER_UID
    assert grafana.state.writes()[-1].body["overwrite"] is True


def test_a_renamed_folder_gets_its_title_back(grafana: FakeGrafana) -> None:
    provision(api(grafana), load_dashboard(), PROMETHEUS_URL)
    grafana.state.folders[FOLDER_UID]["title"] = "renamed"
    assert provision(api(grafana), load_dashboard(), PROMETHEUS_URL).folder == "updated"
    assert grafana.state.folders[FOLDER_UID]["title"] == FOLDER_TITLE


def test_a_wrong_token_is_refused_before_anything_is_written(grafana: FakeGrafana) -> None:
    with pytest.raises(GrafanaUnauthorizedError):
        provision(api(grafana, token="wrong"), load_dashboard(), PROMETHEUS_URL)
    assert not grafana.state.datasources and not grafana.state.dashboards


def test_command_line_provisions_idempotently(grafana: FakeGrafana, capsys: pytest.CaptureFixture) -> None:
    argv = ["provision", "--url", grafana.url, "--token", TOKEN, "--prometheus-url", PROMETHEUS_URL]
    assert main(argv) == 0
    assert "datasource created, folder created, dashboard created" in capsys.readouterr().out
    assert main(argv) == 0
    assert "datasource unchanged, folder unchanged, dashboard unchanged" in capsys.readouterr().out
