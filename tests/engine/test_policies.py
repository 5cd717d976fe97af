"""Scheduling policies: priority order, and fair scheduling that keeps long prompts from starving short ones."""

from __future__ import annotations

from pathlib import Path

from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion

TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16


def finish_order(engine) -> list[str]:
    order = []
    while engine.has_unfinished():
        order += [output.request_id for output in engine.step() if output.finished]
    return order


def test_priority_policy_runs_lower_priority_values_first(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, max_num_seqs=1, scheduling_policy="priority")
    for request_id, priority in [("low", 5), ("high", 1), ("mid", 3)]:
        engine.add_request(request_id, random_prompts(1, 8, 8, seed=priority)[0], greedy(3), priority=priority)
    assert finish_order(engine) == ["high", "mid", "low"]


def test_fcfs_ignores_priority(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, max_num_seqs=1)
    for request_id, priority in [("low", 5), ("high", 1), ("mid", 3)]:
        engine.add_request(request_id, random_prompts(1, 8, 8, seed=priority)[0], greedy(3), priority=priority)
    assert finish_order(engine) == ["low", "high", "mid"]


def first_token_steps(model_dir: Path, policy: str) -> dict[str, int]:
    engine = make_engine(model_dir, scheduling_policy=policy, max_num_batched_tokens=128,
                         long_prefill_token_threshold=32, enable_prefix_caching=False)
    engine.add_request("long", random_prompts(1, 600, 600, seed=1)[0], greedy(2))
    for i, prompt in enumerate(random_prompts(3, 8, 12, seed=2)):
        engine.add_request(f"short{i}", prompt, greedy(2))
    first: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for output in engine.step():
            first.setdefault(output.request_id, step)
    return first


def test_fair_policy_serves_short_prompts_before_a_long_one_finishes_prefill(tiny_llama_dir: Path) -> None:
    fcfs = first_token_steps(tiny_llama_dir, "fcfs")
    fair = first_token_steps(tiny_llama_dir, "fair")
    assert all(fcfs[f"short{i}"] >= fcfs["long"] for i in range(3))  # FCFS: they wait behind the long prefill
    assert all(fair[f"short{i}"] == 1 for i in range(3))  # fair: first token in the first step
    assert fair["long"] <= fcfs["long"] + 2  # and the long prompt is not starved


def test_preemption_under_priority_policy_leaves_outputs_unchanged(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(6, 40, 70, seed=11)

    def run(**kwargs) -> dict:
        engine = make_engine(tiny_llama_dir, **kwargs)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(40), priority=i % 3)
        return run_to_completion(engine), engine

    reference, _ = run()
    for policy in ("priority", "fair"):
        outputs, engine = run(scheduling_policy=policy, kv_cache_memory_bytes=20 * TINY_BLOCK_BYTES,
                              max_model_len=256)
        assert engine.stats().num_preemptions > 0
        assert outputs == reference


def test_the_engine_measures_its_prefill_cost_per_token_on_prefill_heavy_steps(tiny_llama_dir: Path) -> None:
    """The router weighs prefix hits by it: 0 until a step of at least PREFILL_STEP_TOKENS tokens ran."""
    from replicas import SamplingParams
    from replicas.model_runner import PREFILL_STEP_TOKENS

    engine = make_engine(tiny_llama_dir)
    engine.add_request("short", random_prompts(1, 8, 8, seed=1)[0], SamplingParams(max_tokens=2, temperature=0.0))
    run_to_completion(engine)
    assert engine.stats().prefill_seconds_per_token == 0.0  # 8-token prefill and 1-token decodes: not measured
    long_prompt = random_prompts(1, 4 * PREFILL_STEP_TOKENS, 4 * PREFILL_STEP_TOKENS, seed=2)[0]
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=2, temperature=0.0))
    run_to_completion(engine)
    per_token = engine.stats().prefill_seconds_per_token
    assert 0.0 < per_token < 1.0
