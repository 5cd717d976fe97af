"""Start, probe and stop the systems `bench/serving.py` compares, each on 127.0.0.1: the two seed baselines as
subprocesses, and this system as `serve run` of a config derived from deploy/config.yaml, on a Ray head of its own.

Every process is started in a new session and stopped through its process group; the Ray head lives in a temp
directory of its own, so `ray.init()` elsewhere on the machine never finds it (and it never finds theirs).
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import psutil
import yaml

from replicas import OPENMP_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "config.yaml"
SERVE_BIN = Path(sys.executable).parent / "serve"
RAY_BIN = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    from deploy import serve_local

    env = {**serve_local.LOCAL_RAY_ENV, **OPENMP_ENV, **os.environ}  # Ray as `make serve` starts it; OpenMP's own
    env.update({"PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                # Ray runs its workers at nice 15 by default; the baselines and the load generator run at 0, so on
                # a shared 2-core machine the replica would lose the CPU to its own clients. Same footing for all.
                "RAY_worker_niceness": "0"})  # fmt: skip
    return env


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size (VmHWM), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def stop_group(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM to the process group the process leads, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


T = TypeVar("T")


class Poller(Generic[T]):
    """Calls `read` every `period_s` on a thread while the `with` block lasts, keeping what it returns (a failed or
    None reading is skipped: a missed sample is fine)."""

    def __init__(self, read: Callable[[], T | None], period_s: float = 0.5) -> None:
        self.read, self.period_s = read, period_s
        self.samples: list[T] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.read()
            except Exception:  # noqa: BLE001 — a slow or failed answer on a loaded machine: skip this sample
                sample = None
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(self.period_s)


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited with {process.returncode}\n{tail}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s\n{tail}")


# --- the seed baselines ----------------------------------------------------------------------------------------


@dataclass
class BaselineServer:
    """`python -m bench.baselines.<module>` on a free port."""

    module: str
    model: Path
    threads: int
    log_dir: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> None:
        self.port = free_port()
        log = self.log_dir / f"{self.module}.log"
        command = [sys.executable, "-m", f"bench.baselines.{self.module}", "--model", str(self.model),
                   "--port", str(self.port), "--threads", str(self.threads), *self.extra_args]  # fmt: skip
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=server_env(), stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_until(lambda: httpx.get(f"{self.url}/health", timeout=2).status_code == 200, timeout_s,
                   f"{self.module} server", self.process, log)  # fmt: skip

    def reset(self) -> None:
        """Drop the requests the last load level left queued or running."""
        httpx.post(f"{self.url}/reset", timeout=30)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=30).json()

    def peak_rss(self) -> dict[str, int | None]:
        return {f"{self.module} (pid {self.process.pid})": peak_rss_bytes(self.process.pid)}

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


# --- this system through `serve run` ---------------------------------------------------------------------------


def serve_config(variants: dict[str, dict[str, Any]], port: int, model: Path, base: Path = DEPLOY_CONFIG,
                 app_overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """deploy/config.yaml's application once per variant (`/<name>` route, engine fields overridden)."""
    config = yaml.safe_load(base.read_text())
    template = config["applications"][0]
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    applications = []
    for name, engine_overrides in variants.items():
        app = copy.deepcopy(template)
        app["name"] = name
        app["route_prefix"] = f"/{name}"
        app["args"]["model"] = str(model.resolve())
        app["args"]["engine"] = {**app["args"].get("engine", {}), **engine_overrides}
        for key, value in (app_overrides or {}).items():  # `args.x` sets an arg, anything else the app's field
            if key.startswith("args."):
                app["args"][key[5:]] = value
            else:
                app[key] = value
        applications.append(app)
    config["applications"] = applications
    return config


class ServeCluster:
    """A Ray head (own port and temp dir) and `serve run` of the variants' config on it."""

    def __init__(self, variants: dict[str, dict[str, Any]], model: Path, log_dir: Path, num_cpus: int = 8,
                 app_overrides: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.variants = variants
        self.app_overrides = app_overrides
        self.model = model
        self.log_dir = log_dir
        self.num_cpus = num_cpus  # logical: placement only; each replica's torch threads are set in its engine
        self.gcs_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()  # Ray's Prometheus export (bench/soak.py reads the ingress's counters)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
        self.head: subprocess.Popen | None = None
        self.serve: subprocess.Popen | None = None
        self._replicas: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def url(self, variant: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{variant}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 600.0) -> None:
        head_log = self.log_dir / "ray_head.log"
        with head_log.open("w") as out:
            self.head = subprocess.Popen(
                [str(RAY_BIN), "start", "--head", "--block", f"--port={self.gcs_port}",
                 f"--num-cpus={self.num_cpus}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={self.metrics_port}",
                 "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
                 "--disable-usage-stats"],
                cwd=REPO_ROOT, env=server_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: "Ray runtime started" in head_log.read_text(), 120, "ray head", self.head, head_log)
        config_path = self.log_dir / "serve_config.yaml"
        config_path.write_text(yaml.safe_dump(serve_config(self.variants, self.http_port, self.model,
                                                       app_overrides=self.app_overrides)))
        serve_log = self.log_dir / "serve_run.log"
        with serve_log.open("w") as out:
            self.serve = subprocess.Popen([str(SERVE_BIN), "run", "--address", self.address, str(config_path)],
                                          cwd=REPO_ROOT, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip
        for variant in self.variants:
            wait_until(lambda v=variant: httpx.post(f"{self.url(v)}/generate", timeout=60,
                                                    json={"prompt": "Hello", "max_tokens": 1}).status_code == 200,
                       timeout_s, f"serve app {variant}", self.serve, serve_log)  # fmt: skip
        import ray

        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False, configure_logging=False)

    def _replica(self, variant: str) -> Any:
        import ray

        with self._lock:
            if variant not in self._replicas:
                prefix = f"SERVE_REPLICA::{variant}#LLMReplica#"
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"].startswith(prefix)]  # fmt: skip
                if len(names) != 1:
                    raise RuntimeError(f"expected one replica of {variant}, found {names}")
                self._replicas[variant] = ray.get_actor(names[0], namespace="serve")
            return self._replicas[variant]

    def replica_stats(self, variant: str) -> dict[str, Any]:
        """The replica's `record_routing_stats` (load, KV blocks and slots, pid), without the prefix hashes."""
        import ray

        stats = ray.get(self._replica(variant).record_routing_stats.remote(), timeout=30)
        stats.pop("prefix_hashes", None)
        return stats

    def wait_idle(self, variant: str, timeout_s: float = 120.0) -> None:
        """Until the replica has nothing running or waiting (cancelled requests are aborted asynchronously)."""
        wait_until(lambda: (lambda s: s["num_running"] + s["num_waiting"] == 0)(self.replica_stats(variant)),
                   timeout_s, f"{variant} replica to drain")  # fmt: skip

    def peak_rss(self) -> dict[str, int | None]:
        rss = {}
        for variant in self.variants:
            pid = self.replica_stats(variant)["pid"]
            rss[f"{variant} replica (pid {pid})"] = peak_rss_bytes(pid)
        return rss

    def stop(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 — stopping anyway
            pass
        for process in (self.serve, self.head):
            if process is not None:
                stop_group(process, timeout_s=10)
        # Ray daemons started by the head can outlive its group (they start sessions of their own): end those
        # that belong to this head, found by its private temp dir in their command line.
        marker = str(self.temp_dir)
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info.get("cmdline") or [])
            if marker in cmdline and process.pid != os.getpid():
                try:
                    process.terminate()
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
