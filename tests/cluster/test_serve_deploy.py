"""`serve deploy deploy/config.yaml` against a cluster started with `ray start` (a head and a worker), as README says.

Slow profile (`pytest -m slow tests/cluster`): two `ray start` daemons and the default model, a few minutes on two
cores. Everything runs in subprocesses; each `ray start` gets a session of its own, and only those sessions' processes
are stopped at the end (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from replicas import OPENMP_ENV
from tests.serve.conftest import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_processes(session_ids: set[int]) -> list[int]:
    output = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in output.splitlines() if line.strip())
    return [int(pid) for pid, sid in rows if int(sid) in session_ids]


def _stop_sessions(session_ids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_processes(session_ids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _session_processes(session_ids) and time.monotonic() < deadline:
            time.sleep(0.5)


class RayStartCluster:
    """`ray start` nodes in a private temp dir, each in a session of its own; `stop()` ends exactly those."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rdep", dir="/tmp")
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled",
                    **OPENMP_ENV, "TOKENIZERS_PARALLELISM": "false",
                    "RAY_TMPDIR": self.temp_dir}  # fmt: skip
        self.session_ids: set[int] = set()

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray_start(self, *args: str) -> None:
        # NOTE: `ray start` daemonizes; its daemons stay in the session it was started in.
        # Output to a file, not a pipe: a daemon that kept the pipe open would block reading it to the end.
        log_path = Path(self.temp_dir) / f"ray-start-{len(self.session_ids)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [str(BIN / "ray"), "start", "--disable-usage-stats", *args],
                cwd=REPO_ROOT, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
            )
            self.session_ids.add(process.pid)
            returncode = process.wait(timeout=180)
        assert returncode == 0, log_path.read_text()

    def serve(self, *args: str, timeout_s: float = 120) -> str:
        result = subprocess.run([str(BIN / "serve"), *args, "--address", self.dashboard], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def stop(self) -> None:
        _stop_sessions(self.session_ids)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_start_cluster() -> Iterator[RayStartCluster]:
    """A head (1 CPU) and two workers (2 CPUs and one `llm_replica` slot each), as in README."""
    cluster = RayStartCluster()
    try:
        cluster.ray_start(
            "--head", f"--port={cluster.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={cluster.dashboard_port}", "--num-cpus=1",
            f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        )  # fmt: skip
        for _ in range(2):
            cluster.ray_start(
                f"--address=127.0.0.1:{cluster.gcs_port}", "--num-cpus=2", '--resources={"llm_replica": 1}',
                f"--dashboard-agent-listen-port={_free_port()}",
            )
        yield cluster
    finally:
        cluster.stop()


def deploy(cluster: RayStartCluster, config_name: str, tmp_path: Path) -> int:
    """`serve deploy deploy/<config_name>` with only the HTTP port changed (8000 may be taken on a shared machine)."""
    config = yaml.safe_load((REPO_ROOT / "deploy" / config_name).read_text())
    http_port = _free_port()
    config["http_options"]["port"] = http_port
    config_path = tmp_path / config_name
    config_path.write_text(yaml.safe_dump(config))
    cluster.serve("deploy", str(config_path))
    return http_port


@pytest.mark.slow
def test_serve_deploy_config_yaml_on_a_running_cluster(ray_start_cluster: RayStartCluster, tmp_path: Path) -> None:
    http_port = deploy(ray_start_cluster, "config.yaml", tmp_path)

    def running() -> bool:
        status = yaml.safe_load(ray_start_cluster.serve("status"))
        app = status["applications"].get("llm", {})
        return app.get("status") == "RUNNING"

    wait_until(running, timeout_s=300, interval_s=2)
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    status = yaml.safe_load(ray_start_cluster.serve("status"))
    replicas = status["applications"]["llm"]["deployments"]["LLMReplica"]["replica_states"]
    assert replicas == {"RUNNING": 1}, status
    ray_start_cluster.serve("shutdown", "-y")


@pytest.mark.slow
def test_serve_deploy_cluster_config_spreads_replicas(ray_start_cluster: RayStartCluster, tmp_path: Path) -> None:
    http_port = deploy(ray_start_cluster, "config.cluster.yaml", tmp_path)

    def replica_nodes() -> list[str] | None:
        details = httpx.get(f"{ray_start_cluster.dashboard}/api/serve/applications/", timeout=30).json()
        app = details["applications"].get("llm")
        if app is None or app["status"] != "RUNNING":
            return None
        replicas = app["deployments"]["LLMReplica"]["replicas"]
        nodes = [replica["node_id"] for replica in replicas if replica["state"] == "RUNNING"]
        return nodes if len(nodes) == 2 else None

    nodes = wait_until(replica_nodes, timeout_s=300, interval_s=2)
    assert len(set(nodes)) == 2  # initial_replicas 2, one llm_replica slot per worker
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    ray_start_cluster.serve("shutdown", "-y")
