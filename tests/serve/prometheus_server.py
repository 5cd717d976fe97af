"""A real Prometheus for tests: Debian's `prometheus` package, installed when missing, run on loopback.

`running_prometheus(targets)` starts it with a temporary config (a short scrape interval) and storage and stops it
by its PID; `PrometheusClient` asks its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


APT_TIMEOUT_S = 600


def ensure_prometheus() -> str:
    """The `prometheus` binary; installs Debian's package first when it is missing and we are root (CI is)."""
    binary = shutil.which("prometheus")
    if binary:
        return binary
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("prometheus is not installed and this user cannot install it: "
                           "run `apt-get install -y prometheus` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # NOTE: no systemd runs here. Without a policy-rc.d, the package's post-install script would start the
    # service through its init script (listening on every interface); deny that for the install. Each test starts
    # its own server on a free loopback port instead.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# written by tests/serve/prometheus_server.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    try:
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        ):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
            if result.returncode != 0 and command[1] == "install":
                raise RuntimeError(f"installing prometheus failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("apt-get installed prometheus, but the binary is not on PATH")
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusClient:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus error for {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def metric_names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values"))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


@contextmanager
def running_prometheus(targets: list[str], scrape_interval_s: float = 1.0, timeout_s: float = 60.0) -> Iterator[PrometheusClient]:
    binary = ensure_prometheus()
    with tempfile.TemporaryDirectory(prefix="prometheus-test-") as workdir:
        config = Path(workdir) / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        config.write_text(
            f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: {json.dumps(targets)}\n"
        )
        port = _free_port()
        log = open(Path(workdir) / "prometheus.log", "w")  # noqa: SIM115 — closed below, after the process
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = PrometheusClient(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + timeout_s
            while not client.ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"prometheus did not start:\n{(Path(workdir) / 'prometheus.log').read_text()}")
                time.sleep(0.2)
            yield client
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
