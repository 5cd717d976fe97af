"""A local stand-in for the Grafana HTTP API: exactly the endpoints `deploy.grafana.provision` calls.

It keeps datasources, folders and dashboards by uid, answers as Grafana does (404 for a missing object, 409 for
a duplicate, 412 for a dashboard that exists when `overwrite` is false, 401 without the bearer token), and
records every call so tests can check payloads and that a second run changes nothing.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class FakeGrafanaState:
    token: str
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {"dashboard", "folderUid"}
    calls: list[Call] = field(default_factory=list)
    next_id: int = 1

    def writes(self) -> list[Call]:
        return [call for call in self.calls if call.method != "GET"]


class FakeGrafana:
    """`with FakeGrafana(token) as grafana:` serves on 127.0.0.1; `grafana.url`, `grafana.state`."""

    def __init__(self, token: str) -> None:
        self.state = FakeGrafanaState(token)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeGrafana:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(state: FakeGrafanaState) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _respond(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            authorization = self.headers.get("Authorization")
            with lock:
                state.calls.append(Call(method, self.path, body, authorization))
                if authorization != f"Bearer {state.token}":
                    self._respond(401, {"message": "Unauthorized"})
                    return
                status, answer = _route(state, method, self.path, body)
            self._respond(status, answer)

        def do_GET(self) -> None:  # noqa: N802 — http.server's naming
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

    return Handler


def _route(state: FakeGrafanaState, method: str, path: str, body: Any) -> tuple[int, Any]:
    def new_id() -> int:
        state.next_id += 1
        return state.next_id - 1

    if match := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
        uid = match.group(1)
        if method == "GET":
            return (200, state.datasources[uid]) if uid in state.datasources else (404, {"message": "Data source not found"})
        if method == "PUT" and uid in state.datasources:
            stored = state.datasources[uid]
            updated = {**body, "id": stored["id"], "uid": uid, "version": stored["version"] + 1}
            state.datasources[uid] = updated
            return 200, {"datasource": updated, "id": stored["id"], "message": "Datasource updated"}
        return 404, {"message": "Data source not found"}
    if path == "/api/datasources" and method == "POST":
        if body["uid"] in state.datasources or any(d["name"] == body["name"] for d in state.datasources.values()):
            return 409, {"message": "data source with the same name already exists"}
        stored = {**body, "id": new_id(), "version": 1, "orgId": 1, "readOnly": False, "basicAuth": False}
        state.datasources[body["uid"]] = stored
        return 200, {"datasource": stored, "id": stored["id"], "message": "Datasource added", "name": body["name"]}
    if match := re.fullmatch(r"/api/folders/([\w-]+)", path):
        uid = match.group(1)
        if uid not in state.folders:
            return 404, {"message": "folder not found"}
        if method == "GET":
            return 200, state.folders[uid]
        if method == "PUT":
            stored = state.folders[uid]
            state.folders[uid] = {**stored, "title": body["title"], "version": stored["version"] + 1}
            return 200, state.folders[uid]
    if path == "/api/folders" and method == "POST":
        if body.get("uid") in state.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        stored = {"id": new_id(), "uid": body["uid"], "title": body["title"], "version": 1, "url": f"/dashboards/f/{body['uid']}"}
        state.folders[body["uid"]] = stored
        return 200, stored
    if match := re.fullmatch(r"/api/dashboards/uid/([\w-]+)", path):
        uid = match.group(1)
        if method == "GET" and uid in state.dashboards:
            stored = state.dashboards[uid]
            meta = {"folderUid": stored["folderUid"], "url": f"/d/{uid}/paged-serve", "version": stored["dashboard"]["version"]}
            return 200, {"dashboard": stored["dashboard"], "meta": meta}
        return 404, {"message": "Dashboard not found"}
    if path == "/api/dashboards/db" and method == "POST":
        dashboard = body["dashboard"]
        uid = dashboard["uid"]
        if body.get("folderUid") and body["folderUid"] not in state.folders:
            return 400, {"message": "folder not found"}
        existing = state.dashboards.get(uid)
        if existing is not None and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
        version = existing["dashboard"]["version"] + 1 if existing else 1
        dashboard_id = existing["dashboard"]["id"] if existing else new_id()
        state.dashboards[uid] = {"dashboard": {**dashboard, "id": dashboard_id, "version": version},
                                 "folderUid": body.get("folderUid")}  # fmt: skip
        return 200, {"id": dashboard_id, "uid": uid, "url": f"/d/{uid}/paged-serve", "status": "success", "version": version}
    return 404, {"message": f"not found: {method} {path}"}
