"""The seed baselines answer `/generate` as the ingress does, one at a time (naive) or in padded batches (static);
and the load generator drives them end to end. Tiny seeded model, no Ray."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from bench.baselines import naive_flask, static_batching
from bench.baselines.common import GenerateBody
from bench.loadgen import RequestSpec, parse_sse_line, request_cycle, run_level


@pytest.fixture(scope="module")
def naive_app(tiny_llama_dir: Path):
    return naive_flask.create_app(tiny_llama_dir)


def events(response) -> list[dict]:
    lines = response.get_data(as_text=True).splitlines()
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    return [event for line in lines if (event := parse_sse_line(line)) is not None]


def test_naive_answers_generated_text_and_exact_token_usage(naive_app) -> None:
    response = naive_app.test_client().post("/generate", json={"prompt": "Once upon a time", "max_tokens": 5,
                                                               "ignore_eos": True})  # fmt: skip
    assert response.status_code == 200
    body = response.get_json()
    assert isinstance(body["generated_text"], str) and body["generated_text"]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens"] > 0


def test_naive_streams_token_counted_events_then_usage(naive_app) -> None:
    response = naive_app.test_client().post("/generate", json={"prompt": "Hello", "max_tokens": 7,
                                                               "ignore_eos": True, "stream": True})  # fmt: skip
    assert response.mimetype == "text/event-stream"
    received = events(response)
    deltas = [e for e in received if "num_tokens" in e]
    assert sum(e["num_tokens"] for e in deltas) == 7
    assert received[-1]["usage"]["completion_tokens"] == 7


def test_naive_parallel_sampling_returns_n_texts(naive_app) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 1, "ignore_eos": True}
    answer = naive_app.test_client().post("/generate", json=body).get_json()
    assert len(answer["generated_text"]) == 3
    assert answer["usage"]["completion_tokens"] == 12


def test_naive_rejects_a_missing_prompt_like_the_ingress(naive_app) -> None:
    response = naive_app.test_client().post("/generate", json={"max_tokens": 4})
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == "Prompt is required"


def test_naive_reset_drops_a_request_waiting_for_the_model(naive_app, monkeypatch) -> None:
    generator = naive_app.config["generator"]
    client = naive_app.test_client()
    admitted = threading.Event()
    count_prompt = generator.prompt_tokens

    def counted(prompt: str) -> int:  # called right after the request reads the epoch it is admitted under
        admitted.set()
        return count_prompt(prompt)

    monkeypatch.setattr(generator, "prompt_tokens", counted)
    answers = []
    with generator.lock:  # a generation in progress: the next request waits for the model
        waiter = threading.Thread(
            target=lambda: answers.append(client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}))
        )
        waiter.start()
        assert admitted.wait(30)
        assert client.post("/reset").status_code == 200
    waiter.join(timeout=60)
    assert answers[0].status_code == 503
    assert answers[0].get_json()["error"]["code"] == "reset"


@pytest.fixture(scope="module")
def static_batcher(tiny_llama_dir: Path) -> static_batching.StaticBatcher:
    # A long collection timeout: the batch closes when full, so the test does not race the clock.
    return static_batching.StaticBatcher(tiny_llama_dir, batch_size=3, timeout_s=30.0)


def test_static_batch_pads_requests_together_and_each_keeps_its_own_length(static_batcher) -> None:
    before = static_batcher.stats.num_batches
    prompts = ["a", "a much longer prompt than the first one", "mid length prompt"]
    pendings = [static_batcher.submit(GenerateBody(prompt=p, max_tokens=k, ignore_eos=True))
                for p, k in zip(prompts, (2, 6, 4))]  # fmt: skip
    for pending in pendings:
        assert pending.done.wait(60)
        assert pending.error is None
    assert [p.completion_tokens for p in pendings] == [2, 6, 4]
    assert static_batcher.stats.num_batches == before + 1
    # Padding to the longest prompt and decoding to the longest output wastes KV slots.
    assert static_batcher.stats.as_dict()["kv_memory_efficiency"] < 0.9


def test_static_batch_holds_only_requests_that_sample_the_same_way(static_batcher) -> None:
    before = static_batcher.stats.num_batches
    greedy = [static_batcher.submit(GenerateBody(prompt="x", max_tokens=2, ignore_eos=True)) for _ in range(2)]
    sampled = static_batcher.submit(GenerateBody(prompt="y", max_tokens=2, temperature=1.0, ignore_eos=True))
    greedy.append(static_batcher.submit(GenerateBody(prompt="z", max_tokens=2, ignore_eos=True)))
    for pending in greedy:
        assert pending.done.wait(60) and pending.error is None
    assert static_batcher.stats.num_batches == before + 1  # the three greedy ones, not the sampled one
    static_batcher.reset()  # the sampled request waits alone for a batch that would take 30 s to fill
    assert sampled.done.wait(10)
    assert isinstance(sampled.error, static_batching.Cancelled)


def test_static_server_streams_the_whole_answer_when_the_batch_ends(tiny_llama_dir: Path) -> None:
    app = static_batching.create_app(tiny_llama_dir, batch_size=8, timeout_s=0.01)
    response = app.test_client().post("/generate", json={"prompt": "Hi", "max_tokens": 3, "n": 2, "seed": 0,
                                                         "temperature": 1.0, "ignore_eos": True, "stream": True})  # fmt: skip
    received = events(response)
    assert [e["index"] for e in received if "index" in e] == [0, 1]
    assert received[-1]["usage"]["completion_tokens"] == 6
    assert json.loads(app.test_client().get("/stats").get_data())["num_batches"] == 1


@pytest.fixture()
def naive_server(naive_app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, naive_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/generate"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_load_generator_drives_a_baseline_end_to_end(naive_server: str) -> None:
    workload = [RequestSpec("Once upon a time", 4, prompt_tokens=4), RequestSpec("Hello there", 3, prompt_tokens=2)]
    result = asyncio.run(run_level(naive_server, request_cycle(workload), users=2, duration_s=2.0, drain_s=60.0,
                                   warmup_s=0.5))  # fmt: skip
    summary = result.summary()
    assert summary["requests_failed"] == 0 and summary["requests_censored"] == 0
    assert summary["requests_completed"] >= 2
    assert [r.completion_tokens for r in result.records] == [workload[i % 2].max_tokens
                                                             for i in range(len(result.records))]  # fmt: skip
    assert result.window[0] >= 0.5 and any(r.start < result.window[0] for r in result.records)  # warm-up left out
    in_window = sum(n for r in result.records for t, n in r.deliveries if result.window[0] <= t <= result.window[1])
    assert 0 < summary["output_tokens"] <= in_window  # after the window's first burst, or all of it if none
    assert all(r.first_token is not None and r.first_token <= r.end for r in result.records)
    assert summary["tok_per_s"] > 0 and summary["ttft_p50_s"] <= summary["latency_p50_s"]


def test_a_window_without_an_answer_stays_open_until_the_first(naive_server: str) -> None:
    # The window (1 ms) ends before the next request's first token can arrive: it is kept open until one does.
    workload = [RequestSpec("Once upon a time", 8, prompt_tokens=4)]
    result = asyncio.run(run_level(naive_server, request_cycle(workload), users=1, duration_s=0.001, drain_s=60.0,
                                   warmup_s=60.0, warmup_completions=1))  # fmt: skip
    summary = result.summary()
    assert result.duration_s > 0.001
    assert summary["output_tokens"] > 0 and summary["tok_per_s"] > 0
