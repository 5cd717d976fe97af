"""bench.serving's report: targets, the Markdown table and the plots, from synthetic level results."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.loadgen import LevelResult, RequestRecord
from bench.serving import (
    FULL,
    build_report,
    evaluate_targets,
    level_record,
    plot,
    set_utilization,
    users_supported,
)


def level(users: int, tok_per_request: int, seconds_per_request: float, censored: int = 0) -> dict:
    """A closed loop served one request at a time every `seconds_per_request`."""
    records = []
    for i in range(5):
        end = (i + 1) * seconds_per_request
        records.append(RequestRecord(start=i * seconds_per_request, prompt_tokens=100, first_token=end - 0.5,
                                     end=end, completion_tokens=tok_per_request,
                                     deliveries=[(end, tok_per_request)]))  # fmt: skip
    records += [RequestRecord(start=0.0) for _ in range(censored)]
    result = LevelResult(users, 5 * seconds_per_request, 60.0, records, started_at=1000.0 + users)
    record = level_record(result, flops_per_tok=2.7e8, price_per_hour=0.1)
    record.update({"kv_memory_efficiency": 0.97, "kv_usage_peak": 0.5, "max_running": min(users, 64),
                   "prefix_cache_hits": 0, "prefix_cache_queries": 10})  # fmt: skip
    return record


def synthetic_results() -> dict:
    levels = FULL.levels
    systems = {
        "naive": {"mixed": [level(u, 96, 8.0, censored=u - 1) for u in levels], "peak_rss_bytes": {"naive": 2**30},
                  "kv_budget_bytes": 0},
        "static": {"mixed": [level(u, 8 * 96, 26.0, censored=max(0, u - 8)) for u in levels],
                   "peak_rss_bytes": {"static": 2**30}, "kv_budget_bytes": 0},
        "contiguous": {"mixed": [level(u, 96, 1.5) for u in levels], "kv_budget_bytes": 2**30},
        "paged": {"mixed": [level(u, 96, 0.8) for u in levels], "shared_prefix": [level(32, 96, 2.0)],
                  "parallel_sampling": [level(16, 384, 3.0)], "kv_budget_bytes": 2**30,
                  "peak_rss_bytes": {"paged replica (pid 1)": 2 * 2**30}},
        "paged-prefix": {"shared_prefix": [level(32, 96, 0.9)], "kv_budget_bytes": 2**30},
    }  # fmt: skip
    systems["static"]["mixed"][-2]["server_stats"] = {"kv_memory_efficiency": 0.7}
    samples = [{"t": 1000.0 + i, "kv_usage": 0.5, "kv_memory_efficiency": 0.97, "num_running": 8, "num_waiting": 0}
               for i in range(200)]  # fmt: skip
    meta = {"date": "2026-11-24 00:00 UTC", "machine": "2 vCPUs", "model": "SmolLM2-135M-Instruct", "torch": "2.13",
            "threads": 2, "gemm_peak_gflops": 160.0, "weights_bytes": 540_000_000, "price_per_hour": 0.1,
            "mode": asdict(FULL)}  # fmt: skip
    set_utilization(systems, meta["gemm_peak_gflops"] * 1e9)
    return {"meta": meta, "systems": systems, "kv_timelines": {"paged": samples, "contiguous": samples}}


def test_report_lists_every_system_and_judges_every_target(tmp_path: Path) -> None:
    results = synthetic_results()
    results["targets"] = evaluate_targets(results)
    names = [t["target"] for t in results["targets"]]
    assert any("20× naive" in n for n in names) and any("3× static" in n for n in names)
    assert any("1/10 of naive" in n for n in names) and any("prefix caching" in n for n in names)
    assert any("peak RSS" in n for n in names) and any("96%" in n for n in names)
    report = build_report(results)
    assert "No GPU" in report and "GPU utilization" not in report
    for label in ("naive (Flask", "static batching", "contiguous KV", "paged KV"):
        assert label in report
    assert "(est.)" in report  # the naive server's latency at 50 users comes from Little's law
    paths = plot(results, tmp_path, "_test")
    assert [p.name for p in paths] == ["serving_test_throughput.png", "serving_test_latency_cdf.png",
                                       "serving_test_kv_usage.png"]  # fmt: skip
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_users_supported_is_the_largest_level_within_the_bound() -> None:
    levels = [{"users": 1, "latency_p99_s": 5.0}, {"users": 8, "latency_p99_s": 40.0},
              {"users": 32, "latency_p99_s": math.inf}]  # fmt: skip
    assert users_supported(levels, 60.0) == "8"
    assert users_supported(levels, 1.0) == "< 1"


def test_a_failed_system_is_left_out_of_the_table_not_fatal() -> None:
    results = synthetic_results()
    results["systems"]["static"] = {"error": "RuntimeError: did not start"}
    results["targets"] = evaluate_targets(results)
    assert "static batching" not in build_report(results).split("Targets:")[0].split("| system |")[1]


def test_prompt_tokens_from_the_prefix_cache_are_not_counted_as_compute() -> None:
    from bench.serving import discount_prefix_hits

    record = {"prefill_tokens_per_s": 100.0, "tok_per_s": 20.0, "prefix_cache_hits": 75, "prefix_cache_queries": 100}
    discount_prefix_hits(record, flops_per_tok=1e9)
    assert record["achieved_gflops"] == 25 + 20  # a quarter of the prompt tokens computed, plus the output
    untouched = {"prefill_tokens_per_s": 100.0, "tok_per_s": 20.0, "prefix_cache_queries": 0, "achieved_gflops": 1}
    discount_prefix_hits(untouched, flops_per_tok=1e9)
    assert untouched["achieved_gflops"] == 1


def test_utilization_is_achieved_flops_over_the_peak() -> None:
    systems = {"paged": {"mixed": [{"achieved_gflops": 50.0}], "peak_rss_bytes": 1, "kv_budget_bytes": 2}}
    set_utilization(systems, 200e9)
    assert systems["paged"]["mixed"][0]["compute_utilization"] == pytest.approx(0.25)
