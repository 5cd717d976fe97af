"""`python -m deploy.kuberay render`: k8s/'s copies of deploy/ files are current, and drift is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from deploy import kuberay

from .conftest import REPO_ROOT


def copy_sources(root: Path) -> None:
    """A repo root holding the render sources and the rendered files, as committed."""
    for rendered in kuberay.RENDERED_FILES:
        for path in (rendered.source, rendered.target):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / path, root / path)


def test_committed_rendered_files_are_up_to_date() -> None:
    stale = [str(rendered.target) for rendered in kuberay.stale_files()]
    assert not stale, f"{stale} differ from their sources: run `python -m deploy.kuberay render`"


def test_editing_the_gpu_config_makes_its_copy_stale_until_rendered(tmp_path: Path) -> None:
    copy_sources(tmp_path)
    assert kuberay.stale_files(tmp_path) == []
    config = tmp_path / kuberay.GPU_CONFIG
    config.write_text(config.read_text().replace("max_replicas: 8", "max_replicas: 6"))

    assert [rendered.source for rendered in kuberay.stale_files(tmp_path)] == [kuberay.GPU_CONFIG]
    assert [rendered.source for rendered in kuberay.render(tmp_path)] == [kuberay.GPU_CONFIG]
    assert kuberay.stale_files(tmp_path) == []
    assert "max_replicas: 6" in (tmp_path / "k8s/base/serve-config.gpu.yaml").read_text()


def test_a_hand_edited_copy_is_stale(tmp_path: Path) -> None:
    copy_sources(tmp_path)
    copy = tmp_path / "k8s/overlays/cpu/serve-config.cpu.yaml"
    copy.write_text(copy.read_text().replace("max_n: 16", "max_n: 4"))
    assert [rendered.target for rendered in kuberay.stale_files(tmp_path)] == [copy.relative_to(tmp_path)]


def test_cpu_copy_changes_only_where_the_proxy_listens() -> None:
    source = yaml.safe_load((REPO_ROOT / kuberay.CPU_CONFIG).read_text())
    rendered = yaml.safe_load(kuberay.render_cpu_serve_config(REPO_ROOT))
    assert (rendered["proxy_location"], rendered["http_options"]["host"]) == ("EveryNode", "0.0.0.0")
    source["proxy_location"], source["http_options"]["host"] = "EveryNode", "0.0.0.0"
    assert rendered == source


def test_check_command_exits_zero_when_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.kuberay", "render", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_check_command_exits_nonzero_on_drift_and_render_fixes_it(tmp_path: Path) -> None:
    copy_sources(tmp_path)
    (tmp_path / "k8s/base/serve-config.gpu.yaml").write_text("applications: []\n")
    assert kuberay.main(["render", "--check", "--root", str(tmp_path)]) == 1
    assert kuberay.main(["render", "--root", str(tmp_path)]) == 0
    assert kuberay.main(["render", "--check", "--root", str(tmp_path)]) == 0
