"""Offline validation: pod templates and Services against Kubernetes' own schemas (kubernetes-validate, strict), the
RayService against the project's schema of the KubeRay fields it uses."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from .conftest import Build

# The oldest Kubernetes this is meant for, and the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
RAYSERVICE_SCHEMA = json.loads((Path(__file__).parent / "rayservice.schema.json").read_text())


def as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def validate_strictly(resource: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(resource, version, strict=True)


def validate_rayservice(rayservice: dict[str, Any]) -> None:
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_every_pod_template_is_a_valid_kubernetes_pod_template(build: Build) -> None:
    templates = build.pod_templates()
    assert len(templates) == 2  # the head and the one worker group
    for group, template in templates.items():
        validate_strictly(as_pod_template(f"paged-serve-{group}", template))


def test_serve_service_is_a_valid_kubernetes_service(build: Build) -> None:
    service = build.rayservice["spec"]["serveService"]
    validate_strictly({"apiVersion": "v1", "kind": "Service", **service})


def test_dashboard_configmap_is_a_valid_kubernetes_configmap(build: Build) -> None:
    validate_strictly(build.one("ConfigMap"))


def test_pod_template_validation_is_strict() -> None:
    template = {"spec": {"containers": [{"name": "ray-worker", "image": "paged-serve", "imagePullPolicyy": "Always"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strictly(as_pod_template("misspelt-field", template))
    port_as_name = {"name": "ray-worker", "image": "paged-serve", "ports": [{"containerPort": "serve"}]}
    template = {"spec": {"containers": [port_as_name]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strictly(as_pod_template("port-as-string", template))


def test_rayservice_matches_the_project_schema(build: Build) -> None:
    validate_rayservice(build.rayservice)


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[int(key)] if key.isdigit() else obj[key]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


DELETE = object()
BROKEN = {
    "rayStartParams value as a number": ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0),
    "minReplicas as a string": ("spec.rayClusterConfig.workerGroupSpecs.0.minReplicas", "1"),
    "enableInTreeAutoscaling as a string": ("spec.rayClusterConfig.enableInTreeAutoscaling", "true"),
    "threshold as a string": ("spec.serviceUnhealthySecondThreshold", "900"),
    "rayVersion as a number": ("spec.rayClusterConfig.rayVersion", 2.6),
    "serveConfigV2 as a mapping": ("spec.serveConfigV2", {"applications": []}),
    "misspelt field": ("spec.rayClusterConfig.enableInTreeAutoScaling", True),
    "unknown upscaling mode": ("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast"),
    "wrong apiVersion": ("apiVersion", "ray.io/v1alpha1"),
    "missing serveConfigV2": ("spec.serveConfigV2", DELETE),
    "missing rayVersion": ("spec.rayClusterConfig.rayVersion", DELETE),
    "missing headGroupSpec": ("spec.rayClusterConfig.headGroupSpec", DELETE),
    "missing worker groupName": ("spec.rayClusterConfig.workerGroupSpecs.0.groupName", DELETE),
    "missing worker maxReplicas": ("spec.rayClusterConfig.workerGroupSpecs.0.maxReplicas", DELETE),
    "missing pod template": ("spec.rayClusterConfig.workerGroupSpecs.0.template", DELETE),
}


@pytest.mark.parametrize("change", list(BROKEN))
def test_project_schema_rejects_a_wrong_type_or_a_missing_field(builds: dict[str, Build], change: str) -> None:
    rayservice = copy.deepcopy(builds["gpu"].rayservice)
    validate_rayservice(rayservice)
    _set(rayservice, *BROKEN[change])
    with pytest.raises(jsonschema.ValidationError):
        validate_rayservice(rayservice)
