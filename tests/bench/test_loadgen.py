"""The load generator's statistics and workloads (no server, no model)."""

from __future__ import annotations

import math

import pytest

from bench.loadgen import (
    RequestRecord,
    RequestSpec,
    mixed_workload,
    parallel_sampling_workload,
    parse_sse_line,
    percentile,
    shared_prefix_workload,
    summarize,
    word_vocabulary,
)

WORDS = [f"w{i}" for i in range(50)]


def completed(start: float, first: float, end: float, tokens: int) -> RequestRecord:
    return RequestRecord(start=start, first_token=first, end=end, completion_tokens=tokens,
                         deliveries=[(first, 1), (end, tokens - 1)])  # fmt: skip


def test_percentile_is_nearest_rank_and_sorts_infinity_last() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([3.0, math.inf, 1.0], 0.5) == 3.0
    assert percentile([1.0, math.inf], 0.99) == math.inf
    assert math.isnan(percentile([], 0.5))


def test_throughput_is_measured_from_the_last_delivery_before_the_window_to_the_last_in_it() -> None:
    records = [completed(0.0, 1.0, 4.0, 10), completed(0.0, 2.0, 8.0, 30), completed(4.0, 5.0, 20.0, 50),
               completed(12.0, 13.0, 14.0, 7)]  # fmt: skip
    summary = summarize(records, users=2, window=(2.0, 10.0))
    # Deliveries inside [2, 10]: 1 at t=2, 9 at t=4, 1 at t=5, 29 at t=8 (the last), timed from the last one
    # before the window (t=1). Drain deliveries (t=13, 14, 20) are left out.
    assert summary["elapsed_s"] == 7.0
    assert summary["output_tokens"] == 1 + 9 + 1 + 29
    assert summary["tok_per_s"] == pytest.approx(40 / 7.0)
    # Request rate = token rate ÷ the mean tokens of a completed request (10, 30, 50, 7).
    assert summary["req_per_s"] == pytest.approx((40 / 7.0) / (97 / 4))


def test_a_bursty_server_is_measured_from_burst_to_burst() -> None:
    # Batches of 4 answered whole every 10 s (the answers a few ms apart), the first at t=3: a 25 s window sees
    # bursts at 3, 13, 23; the two intervals between them hold two bursts.
    records = []
    for batch in range(4):
        for i in range(4):
            end = batch * 10.0 + 3 + 0.002 * i
            records.append(RequestRecord(start=end - 10, first_token=end, end=end, completion_tokens=100,
                                         deliveries=[(end, 100)]))  # fmt: skip
    summary = summarize(records, users=4, window=(0.0, 25.0))
    assert summary["tok_per_s"] == pytest.approx(2 * 4 * 100 / (23.006 - 3.006))
    assert summary["req_per_s"] == pytest.approx(2 * 4 / (23.006 - 3.006))  # 100 tokens per request


def test_a_window_holding_one_burst_is_timed_from_the_burst_before_it() -> None:
    # Batches of 4 answered whole every 17 s, at t=3 (warm-up) and t=20; a 30 s window from t=5 holds one burst.
    records = [RequestRecord(start=0.0, first_token=end, end=end, completion_tokens=100, deliveries=[(end, 100)])
               for end in (3.0, 3.0, 3.0, 3.0, 20.0, 20.0, 20.0, 20.0)]  # fmt: skip
    summary = summarize(records, users=4, window=(5.0, 35.0))
    assert summary["elapsed_s"] == 17.0
    assert summary["tok_per_s"] == pytest.approx(400 / 17.0)


def test_deliveries_that_never_pause_are_measured_over_the_whole_window() -> None:
    record = RequestRecord(start=0.0, first_token=0.1, end=20.0, completion_tokens=200,
                           deliveries=[(k / 10, 1) for k in range(1, 201)])  # fmt: skip
    summary = summarize([record], users=1, window=(5.0, 15.0))
    assert summary["elapsed_s"] == pytest.approx(10.1)  # from t = 4.9, the last delivery before the window
    assert summary["tok_per_s"] == pytest.approx(101 / 10.1)  # t = 5.0, 5.1, ..., 15.0
    alone = summarize([record], users=1, window=(0.0, 30.0))  # nothing before the window, no pause: all of it
    assert alone["elapsed_s"] == 30.0
    assert alone["tok_per_s"] == pytest.approx(200 / 30.0)


def test_latency_statistics_cover_the_requests_started_in_the_window() -> None:
    records = [completed(0.0, 0.5, 2.0, 4), completed(1.0, 2.0, 5.0, 4), completed(2.0, 3.0, 6.0, 4),
               completed(12.0, 12.5, 30.0, 4)]  # fmt: skip
    summary = summarize(records, users=2, window=(1.0, 10.0))
    # Started in [1, 10]: the second and third (the first is warm-up, the fourth started in the drain).
    assert summary["requests_started"] == 2 and summary["requests_completed"] == 2
    assert summary["latency_mean_s"] == pytest.approx((4 + 4) / 2)
    assert not summary["latency_mean_estimated"]
    assert summary["latency_p50_s"] == 4.0
    assert summary["ttft_p50_s"] == 1.0
    # Deliveries in the window, timed from the last one before it (t=0.5): 3 + 1 + 1 + 3 + 3 tokens by t=6; 4
    # tokens a request.
    assert summary["req_per_s"] == pytest.approx((11 / 5.5) / 4)


def test_censored_requests_push_percentiles_to_a_lower_bound_and_the_mean_to_littles_law() -> None:
    records = [completed(0.0, 1.0, 10.0, 5), completed(10.0, 11.0, 20.0, 5)]
    records += [RequestRecord(start=0.0) for _ in range(8)]  # queued behind a one-at-a-time server, cut off
    summary = summarize(records, users=9, window=(0.0, 30.0))
    assert summary["requests_censored"] == 8
    assert summary["latency_p99_s"] == math.inf
    assert summary["ttft_p99_s"] == math.inf
    # 9 tokens in the 19 s after the first delivery, 5 tokens a request: 0.095 requests/s with 9 users in the loop;
    # Little's law gives 9 / 0.095 = 95 s, not the survivors' 10 s.
    assert summary["latency_mean_estimated"]
    assert summary["latency_mean_measured_s"] == pytest.approx(10.0)
    assert summary["latency_mean_s"] == pytest.approx(9 / ((9 / 19) / 5))


def test_failed_requests_are_reported_not_counted_as_served() -> None:
    records = [completed(0.0, 1.0, 2.0, 3), RequestRecord(start=0.0, end=0.1, error="HTTP 429: busy")]
    summary = summarize(records, users=2, window=(0.0, 10.0))
    assert summary["requests_failed"] == 1
    assert summary["requests_completed"] == 1
    assert summary["errors"] == ["HTTP 429: busy"]


def test_sse_lines_parse_to_payloads() -> None:
    assert parse_sse_line('data: {"index": 0, "text": "hi", "num_tokens": 1}') == {"index": 0, "text": "hi",
                                                                                   "num_tokens": 1}  # fmt: skip
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line("") is None
    assert parse_sse_line(": keep-alive") is None


def test_workloads_are_seeded_and_within_their_ranges() -> None:
    first, again, other = (mixed_workload(WORDS, 20, seed) for seed in (1, 1, 2))
    assert first == again
    assert first != other
    assert all(32 <= spec.prompt_tokens <= 256 and 64 <= spec.max_tokens <= 128 for spec in first)
    assert all(len(spec.prompt.split()) == spec.prompt_tokens for spec in first)


def test_shared_prefix_requests_share_their_system_prompt() -> None:
    specs = shared_prefix_workload(WORDS, 5, seed=0, prefix_len=100)
    prefixes = {spec.prompt.split("\n")[0] for spec in specs}
    assert len(prefixes) == 1 and len(prefixes.pop().split()) == 100
    assert len({spec.prompt for spec in specs}) == 5


def test_parallel_sampling_requests_ask_for_n_seeded_samples() -> None:
    specs = parallel_sampling_workload(WORDS, 3, seed=0, n=4)
    bodies = [spec.body() for spec in specs]
    assert all(body["n"] == 4 and body["temperature"] == 1.0 and body["stream"] for body in bodies)
    assert len({body["seed"] for body in bodies}) == 3


def test_request_body_is_the_generate_shape() -> None:
    body = RequestSpec("hello", 16).body()
    assert body == {"prompt": "hello", "max_tokens": 16, "ignore_eos": True, "stream": True, "temperature": 0.0}


def test_word_vocabulary_gives_one_token_per_word(default_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    words = word_vocabulary(tokenizer)
    spec = mixed_workload(words, 1, seed=3)[0]
    num_tokens = len(tokenizer(spec.prompt).input_ids)
    assert abs(num_tokens - spec.prompt_tokens) <= 1
