"""Render the files the KubeRay manifests in `k8s/` copy from `deploy/`, and check that they have not drifted.

Kustomize reads no file outside the kustomization's folder, so what `k8s/` needs from `deploy/` is rendered into it:

- `k8s/base/serve-config.gpu.yaml`: `deploy/config.gpu.yaml` as it is; it becomes the RayService's `serveConfigV2`.
- `k8s/overlays/cpu/serve-config.cpu.yaml`: `deploy/config.yaml` with the HTTP proxy listening on the pod's
  address on every node (a pod that binds 127.0.0.1 is unreachable through a Service); nothing else changes.
- `k8s/base/grafana/paged-serve.json`: `deploy/grafana/dashboard.json`, which becomes the Grafana dashboard ConfigMap.

`python -m deploy.kuberay render` writes them; `python -m deploy.kuberay render --check` writes nothing and exits 1
when any of them differs from what its source renders to (the tests run the same check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent

GPU_CONFIG = Path("deploy/config.gpu.yaml")
CPU_CONFIG = Path("deploy/config.yaml")
DASHBOARD = Path("deploy/grafana/dashboard.json")

# What the CPU overlay changes in deploy/config.yaml: in a pod the proxy must listen on the pod's address, and on
# every node, because KubeRay's Serve Service sends traffic to each pod whose proxy is healthy.
CPU_CLUSTER_OVERRIDES = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0"}}


def _header(source: Path, note: str = "") -> str:
    lines = [f"# Generated from {source} by `python -m deploy.kuberay render`: edit that file, not this one."]
    if note:
        lines.append(f"# {note}")
    return "\n".join(lines) + "\n"


def render_gpu_serve_config(root: Path) -> str:
    """The GPU deploy config verbatim (its comments included: they show in `kubectl get rayservice -o yaml`)."""
    return _header(GPU_CONFIG) + (root / GPU_CONFIG).read_text()


def render_cpu_serve_config(root: Path) -> str:
    config = yaml.safe_load((root / CPU_CONFIG).read_text())
    config["proxy_location"] = CPU_CLUSTER_OVERRIDES["proxy_location"]
    config.setdefault("http_options", {}).update(CPU_CLUSTER_OVERRIDES["http_options"])
    note = "Changed for a cluster: proxy_location EveryNode, http_options.host 0.0.0.0 (pods are reached by address)."
    return _header(CPU_CONFIG, note) + yaml.safe_dump(config, sort_keys=False)


def render_dashboard(root: Path) -> str:
    return (root / DASHBOARD).read_text()


@dataclass(frozen=True)
class RenderedFile:
    target: Path  # relative to the repo root
    source: Path
    render: Callable[[Path], str]


RENDERED_FILES = (
    RenderedFile(Path("k8s/base/serve-config.gpu.yaml"), GPU_CONFIG, render_gpu_serve_config),
    RenderedFile(Path("k8s/overlays/cpu/serve-config.cpu.yaml"), CPU_CONFIG, render_cpu_serve_config),
    RenderedFile(Path("k8s/base/grafana/paged-serve.json"), DASHBOARD, render_dashboard),
)


def stale_files(root: Path = REPO_ROOT) -> list[RenderedFile]:
    """The rendered files whose content differs from what their source renders to now (or that are missing)."""
    stale = []
    for rendered in RENDERED_FILES:
        target = root / rendered.target
        if not target.exists() or target.read_text() != rendered.render(root):
            stale.append(rendered)
    return stale


def render(root: Path = REPO_ROOT) -> list[RenderedFile]:
    """Write every stale rendered file; returns the ones written."""
    written = stale_files(root)
    for rendered in written:
        target = root / rendered.target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rendered.render(root))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.kuberay", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_command = commands.add_parser("render", help="write k8s/'s copies of deploy/ files")
    render_command.add_argument("--check", action="store_true", help="write nothing; exit 1 if any copy is stale")
    render_command.add_argument("--root", type=Path, default=REPO_ROOT, help="the repo root (default: this checkout)")
    args = parser.parse_args(argv)

    if args.check:
        stale = stale_files(args.root)
        for rendered in stale:
            print(f"{rendered.target} is out of date with {rendered.source}", file=sys.stderr)
        if stale:
            print("run `python -m deploy.kuberay render` and commit the result", file=sys.stderr)
            return 1
        print(f"{len(RENDERED_FILES)} rendered files are up to date")
        return 0
    for rendered in render(args.root):
        print(f"wrote {rendered.target} from {rendered.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
