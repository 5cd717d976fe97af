"""The soak (bench/soak.py) for 3 minutes in the test session's Serve: mixed load, client disconnects, a replica
SIGKILLed after a minute and replaced by Serve; no failed request, no leaked KV block, counters that match the
client's. RSS growth is reported, not asserted: over 3 minutes of a loaded 2-core machine the allocator's and
Ray's own working set still move by more than the 5% the 30-minute soak allows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.soak import SoakConfig, run_soak
from tests.serve.conftest import ServedApp

SOAK_APP = "soak"


@pytest.fixture(scope="module")
def soak_app(serve_port: int, tiny_llama_dir: Path) -> Iterator[ServedApp]:
    """Two replicas of the tiny Llama in an app of its own (its replicas are killed), removed afterwards."""
    from ray import serve

    from router.app import build_app

    app = build_app({
        "model": str(tiny_llama_dir),
        "served_model_name": SOAK_APP,
        "num_replicas": 2,
        "replica_num_cpus": 0.2,
        "ingress_num_cpus": 0.2,
        "engine": {
            "dtype": "float32",
            "kv_cache_memory_bytes": 16 * 2**20, "max_num_seqs": 8, "max_model_len": 1024, "num_threads": 1
        },
        "routing_stats_period_s": 0.5,
    })  # fmt: skip
    serve.run(app, name=SOAK_APP, route_prefix=f"/{SOAK_APP}")
    try:
        yield ServedApp(SOAK_APP, f"http://127.0.0.1:{serve_port}/{SOAK_APP}", SOAK_APP)
    finally:
        serve.delete(SOAK_APP)


@pytest.mark.slow
def test_a_three_minute_soak_with_a_replica_killed_passes(soak_app: ServedApp, metrics_export_port: int) -> None:
    config = SoakConfig(minutes=3, users=8, kill_every_min=1, max_kills=1, warmup_minutes=0.5, sample_s=10,
                        max_tokens=48, long_prompt_words=(150, 300), restart_timeout_s=240, drain_timeout_s=180,
                        metrics_timeout_s=90)  # fmt: skip
    result = run_soak(soak_app.base_url, SOAK_APP, f"http://127.0.0.1:{metrics_export_port}/metrics", config)
    summary = json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1)
    verdicts = {c["name"]: c["verdict"] for c in result["criteria"]}
    assert result["outcomes"].get("ok", 0) > 0, summary
    assert len(result["kills"]) == 1 and all(k["restarted_after_s"] is not None for k in result["kills"]), summary
    assert result["outcomes"].get("failed", 0) == 0, summary
    assert sum(result["leaked_blocks"].values()) == 0 and len(result["leaked_blocks"]) == 2, summary
    assert verdicts["metrics consistent with the client"] == "PASS", summary
    # Disconnects happened and did not count as failures; the kill's requests migrated (none gave up).
    assert result["outcomes"].get("dropped", 0) + result["outcomes"].get("timed_out", 0) > 0, summary
    assert result["migrations"].get("gave_up", 0) == 0, summary
