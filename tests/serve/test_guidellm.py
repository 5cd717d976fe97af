"""guidellm (the vLLM project's load generator) benchmarks the served app as users run it: 0 failed requests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import ServedApp

NUM_REQUESTS = 4


def _guidellm() -> str:
    found = shutil.which("guidellm") or str(Path(sys.executable).with_name("guidellm"))
    if not Path(found).exists():
        pytest.fail("guidellm is missing: it is a test extra (`make setup` installs it with torch pinned by constraints.txt)")
    return found


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_streaming_benchmark_has_no_failed_requests(
    tiny_app: ServedApp, tiny_llama_dir: Path, tmp_path: Path, request_format: str
) -> None:
    report = tmp_path / "benchmarks.json"
    command = [
        _guidellm(), "run",
        "--backend", f"kind=openai_http,target={tiny_app.base_url},model={tiny_app.model_id},"
                     f"request_format={request_format}",
        "--profile", "kind=concurrent,streams=2",
        "--constraint", f"kind=max_requests,count={NUM_REQUESTS}",
        "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
        # The local model directory: guidellm sizes its synthetic prompts with it, and nothing is downloaded.
        "--tokenizer", f"kind=huggingface_auto,model={tiny_llama_dir}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0, totals
    assert totals["successful"] >= NUM_REQUESTS
