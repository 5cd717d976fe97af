"""The KubeRay manifests as `kubectl kustomize` builds them (no cluster: the kubectl client only)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
VARIANTS = {"gpu": K8S, "cpu": K8S / "overlays" / "cpu"}


@dataclass(frozen=True)
class Build:
    """One `kubectl kustomize` output."""

    variant: str
    objects: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        found = [obj for obj in self.objects if obj["kind"] == kind]
        assert len(found) == 1, f"{self.variant}: expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def rayservice(self) -> dict[str, Any]:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    def pod_templates(self) -> dict[str, dict[str, Any]]:
        """Every pod template of the RayService, by group ("head", then the worker groups' names)."""
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        templates = {"head": cluster["headGroupSpec"]["template"]}
        for group in cluster["workerGroupSpecs"]:
            templates[group["groupName"]] = group["template"]
        return templates

    def worker_groups(self) -> list[dict[str, Any]]:
        return self.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "the kubectl client is needed to build k8s/ (kubectl kustomize)"
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="session")
def builds() -> dict[str, Build]:
    return {variant: Build(variant, kustomize(directory)) for variant, directory in VARIANTS.items()}


@pytest.fixture(scope="session", params=list(VARIANTS))
def build(request: pytest.FixtureRequest, builds: dict[str, Build]) -> Build:
    return builds[request.param]
