"""Provision Grafana through its HTTP API (`grafana-client`): the Prometheus datasource, a folder, the dashboard.

Idempotent: each object has a fixed uid; it is created when missing, updated when it differs, left alone when it
matches. The dashboard is uploaded with `overwrite` into the folder, so a second run changes nothing but the
dashboard's version (Grafana bumps it on every save, so an unchanged dashboard is not uploaded again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError

from deploy.grafana.dashboard import DATASOURCE_UID

logger = logging.getLogger(__name__)

FOLDER_UID = "paged-serve"
FOLDER_TITLE = "paged-serve"
DATASOURCE_NAME = "paged-serve Prometheus"

Change = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class ProvisionResult:
    datasource: Change
    folder: Change
    dashboard: Change
    dashboard_url: str | None = None


def datasource_body(prometheus_url: str, scrape_interval: str = "15s") -> dict[str, Any]:
    """The Prometheus datasource as Grafana's API takes it."""
    return {
        "uid": DATASOURCE_UID,
        "name": DATASOURCE_NAME,
        "type": "prometheus",
        "access": "proxy",  # Grafana's server queries Prometheus, not the browser
        "url": prometheus_url,
        "isDefault": False,
        # timeInterval: Prometheus's scrape interval, so $__rate_interval always spans several samples.
        "jsonData": {"httpMethod": "POST", "timeInterval": scrape_interval},
    }


def provision(
    api: GrafanaApi, dashboard: dict[str, Any], prometheus_url: str, scrape_interval: str = "15s"
) -> ProvisionResult:
    """Create or update the datasource, the folder and the dashboard; report what changed."""
    datasource = _ensure_datasource(api, datasource_body(prometheus_url, scrape_interval))
    folder = _ensure_folder(api)
    dashboard_change, url = _upload_dashboard(api, dashboard)
    result = ProvisionResult(datasource, folder, dashboard_change, url)
    logger.info("grafana: %s", result)
    return result


def _get_or_none(call: Any, *args: Any) -> dict[str, Any] | None:
    try:
        return call(*args)
    except GrafanaClientError as error:
        if error.status_code == 404:
            return None
        raise


def _ensure_datasource(api: GrafanaApi, body: dict[str, Any]) -> Change:
    existing = _get_or_none(api.datasource.get_datasource_by_uid, body["uid"])
    if existing is None:
        api.datasource.create_datasource(body)
        return "created"
    if _contains(existing, body):
        return "unchanged"
    api.datasource.update_datasource_by_uid(body["uid"], {**body, "version": existing.get("version")})
    return "updated"


def _ensure_folder(api: GrafanaApi) -> Change:
    existing = _get_or_none(api.folder.get_folder, FOLDER_UID)
    if existing is None:
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
        return "created"
    if existing.get("title") == FOLDER_TITLE:
        return "unchanged"
    api.folder.update_folder(FOLDER_UID, title=FOLDER_TITLE, version=existing.get("version"), overwrite=True)
    return "updated"


def _upload_dashboard(api: GrafanaApi, dashboard: dict[str, Any]) -> tuple[Change, str | None]:
    existing = _get_or_none(api.dashboard.get_dashboard, dashboard["uid"])
    if existing is not None:
        stored = existing.get("dashboard", {})
        same_folder = existing.get("meta", {}).get("folderUid") == FOLDER_UID
        if same_folder and _strip_volatile(stored) == _strip_volatile(dashboard):
            return "unchanged", existing.get("meta", {}).get("url")
    # NOTE: id None + a fixed uid: Grafana matches the dashboard by uid; overwrite replaces whatever is there.
    payload = {
        "dashboard": {**dashboard, "id": None},
        "folderUid": FOLDER_UID,
        "overwrite": True,
        "message": "provisioned by python -m deploy.grafana",
    }
    response = api.dashboard.update_dashboard(payload)
    return ("created" if existing is None else "updated"), (response or {}).get("url")


def _contains(actual: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether every field of `wanted` has its value in `actual` (Grafana adds fields of its own)."""
    for key, value in wanted.items():
        if isinstance(value, dict):
            if not isinstance(actual.get(key), dict) or not _contains(actual[key], value):
                return False
        elif actual.get(key) != value:
            return False
    return True


def _strip_volatile(dashboard: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in dashboard.items() if key not in ("id", "version")}
