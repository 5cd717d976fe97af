"""What `kubectl kustomize k8s/` (GPU) and `k8s/overlays/cpu` build, checked against the Serve configs they deploy."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy import kuberay
from router.app import AppArgs
from router.ingress import API_KEY_ENV

from .conftest import REPO_ROOT, Build

SOURCE_CONFIG = {"gpu": kuberay.GPU_CONFIG, "cpu": kuberay.CPU_CONFIG}
DOCKERFILE = REPO_ROOT / "k8s" / "Dockerfile"


def containers(template: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def port_numbers(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def pyproject_ray_version() -> str:
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in dependencies if re.match(r"ray(\[.*\])?==", d)]
    return ray.split("==")[1]


def test_builds_the_rayservice_and_its_monitoring(build: Build) -> None:
    kinds = sorted(obj["kind"] for obj in build.objects)
    assert kinds == ["ConfigMap", "PodMonitor", "RayService"]  # the serveConfigV2 carrier is local-config: not applied
    assert build.rayservice["apiVersion"] == "ray.io/v1"
    assert build.one("PodMonitor")["apiVersion"] == "monitoring.coreos.com/v1"


def test_serve_config_v2_parses_with_rays_schema_and_equals_the_deploy_config(build: Build) -> None:
    text = build.rayservice["spec"]["serveConfigV2"]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert [app.import_path for app in schema.applications] == ["router.app:build_app"]

    source = yaml.safe_load((REPO_ROOT / SOURCE_CONFIG[build.variant]).read_text())
    if build.variant == "cpu":  # the one change the overlay makes (test_render checks it is the only one)
        source["proxy_location"], source["http_options"]["host"] = "EveryNode", "0.0.0.0"
    assert build.serve_config == source
    if build.variant == "gpu":  # the GPU config verbatim, comments included
        assert text == kuberay.render_gpu_serve_config(REPO_ROOT)


def test_application_args_are_accepted_by_build_app(build: Build) -> None:
    for app in build.serve_config["applications"]:
        AppArgs.model_validate(app["args"])


def test_image_tag_ray_version_and_pyproject_agree(build: Build) -> None:
    version = pyproject_ray_version()
    cluster = build.rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == version
    expected_tag = f"ray{version}-" + {"gpu": "cu128", "cpu": "cpu"}[build.variant]
    for group, template in build.pod_templates().items():
        for container in containers(template):
            # REGISTRY/ may be set with `kustomize edit set image` (README); the tag must name the Ray version.
            assert re.fullmatch(rf"([^:]+/)?paged-serve:{re.escape(expected_tag)}", container["image"]), group
    assert f"ARG RAY_VERSION={version}\n" in DOCKERFILE.read_text()


def test_head_runs_no_serve_replicas(build: Build) -> None:
    head = build.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in ray_container(head["template"])["resources"]["limits"]


def test_every_container_requests_what_it_limits(build: Build) -> None:
    for group, template in build.pod_templates().items():
        for container in containers(template):
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], (group, container["name"])


def test_gpu_workers_have_one_gpu_each_and_enough_for_the_replicas(builds: dict[str, Build]) -> None:
    build = builds["gpu"]
    cluster = build.rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = build.worker_groups()
    resources = ray_container(group["template"])["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    args = build.serve_config["applications"][0]["args"]
    replicas = deployment(build.serve_config, "LLMReplica")["autoscaling_config"]
    assert args["replica_num_gpus"] == 1
    assert group["maxReplicas"] >= replicas["max_replicas"] * args["replica_num_gpus"]
    assert group["replicas"] >= replicas["initial_replicas"] * args["replica_num_gpus"]
    # Each GPU pod holds its replica and an ingress replica beside it.
    assert cpus(resources["limits"]["cpu"]) >= args["replica_num_cpus"] + args["ingress_num_cpus"]


def test_cpu_overlay_has_no_gpus_and_fits_its_application(builds: dict[str, Build]) -> None:
    build = builds["cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(build.objects)
    (group,) = build.worker_groups()
    args = build.serve_config["applications"][0]["args"]
    assert args.get("replica_num_gpus", 0) == 0 and args["engine"]["device"] == "cpu"
    limits = ray_container(group["template"])["resources"]["limits"]
    assert cpus(limits["cpu"]) >= args["replica_num_cpus"] + args["ingress_num_cpus"]
    assert group["minReplicas"] == group["maxReplicas"] == 1


def test_ports_for_serve_dashboard_and_metrics(build: Build) -> None:
    serve_port = build.serve_config["http_options"]["port"]
    templates = build.pod_templates()
    head_ports = port_numbers(ray_container(templates.pop("head")))
    assert head_ports["serve"] == serve_port and head_ports["dashboard"] == 8265 and head_ports["metrics"] == 8080
    for group, template in templates.items():
        assert port_numbers(ray_container(template)) == {"serve": serve_port, "metrics": 8080}, group
    service_ports = build.rayservice["spec"]["serveService"]["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in service_ports] == [("serve", serve_port)]


def test_api_key_comes_from_a_secret_on_every_worker(build: Build) -> None:
    for group, template in build.pod_templates().items():
        env = {var["name"]: var for var in ray_container(template).get("env", [])}
        if group == "head":  # no ingress there (num-cpus 0): the key stays off the head
            assert API_KEY_ENV not in env
            continue
        secret = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
        assert (secret["name"], secret["key"]) == ("paged-serve-api-key", "api-key")
        assert "value" not in env[API_KEY_ENV]
        # Required on GPU clusters (no open API by accident); optional on a laptop.
        assert secret.get("optional", False) is (build.variant == "cpu")


def test_model_directory_resolves_inside_the_model_volume(build: Build) -> None:
    """Ray's workers run in the image's WORKDIR, so the config's relative model path lands in the mounted volume."""
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    model = Path(workdir) / build.serve_config["applications"][0]["args"]["model"]
    for group, template in build.pod_templates().items():
        if group == "head":
            continue
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        (mount,) = [m for m in ray_container(template)["volumeMounts"] if model.is_relative_to(m["mountPath"])]
        volume = volumes[mount["name"]]
        if build.variant == "gpu":
            assert volume["persistentVolumeClaim"] == {"claimName": "paged-serve-models", "readOnly": True}
        else:  # filled by the init container with the default model
            assert "emptyDir" in volume
            (init,) = template["spec"]["initContainers"]
            assert init["command"][:3] == ["python", "-m", "replicas.default_model"]
            assert init["command"][init["command"].index("--output") + 1] == str(model)
            assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}[mount["name"]] == mount["mountPath"]


def test_pod_monitor_selects_the_ray_pods_on_their_metrics_port(build: Build) -> None:
    monitor = build.one("PodMonitor")["spec"]
    selector = monitor["selector"]["matchLabels"]
    assert selector.pop("ray.io/is-ray-node") == "yes"  # KubeRay's label on every Ray pod
    for group, template in build.pod_templates().items():
        assert selector.items() <= template["metadata"]["labels"].items(), group
        assert "metrics" in port_numbers(ray_container(template))
    assert [endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_kustomization_files_reference_only_files_inside_k8s(variant: str) -> None:
    """Kustomize's load restrictor: everything a build reads lives under k8s/ (rendered there from deploy/)."""
    directory = {"gpu": REPO_ROOT / "k8s" / "base", "cpu": REPO_ROOT / "k8s" / "overlays" / "cpu"}[variant]
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            path = (directory / entry.split("=")[-1]).resolve()
            assert path.is_relative_to(REPO_ROOT / "k8s") and path.exists(), entry


def test_grafana_dashboard_is_a_configmap_for_grafanas_sidecar(build: Build) -> None:
    configmap = build.one("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    assert text == (REPO_ROOT / kuberay.DASHBOARD).read_text()
    assert json.loads(text)["uid"] == "paged-serve"
    # `kubectl apply` (client side) copies the object into an annotation, which Kubernetes caps at 256 KiB.
    assert len(json.dumps(configmap)) < 256 * 1024
