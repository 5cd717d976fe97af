"""Prompt logprobs: each prompt token's logprob, rank and top alternatives equal transformers' float32 log-softmax
of the prompt, alone, batched, across prefill chunks, and when the prompt's prefix is in the prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replicas import SamplingParams
from replicas.contract import RequestOutput, TokenLogprobs
from tests.engine.helpers import greedy, make_engine, random_prompts

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """`[len(prompt) - 1, vocab]`: row `i` is the log-softmax that scores prompt token `i + 1`."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches_hf(model, prompt: list[int], entries: list[TokenLogprobs | None] | None, num_top: int) -> None:
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    reference = hf_prompt_logprobs(model, prompt)
    for position, entry in enumerate(entries[1:], start=1):
        row = reference[position - 1]
        token_id = prompt[position]
        assert entry.token_id == token_id
        assert abs(entry.logprob - float(row[token_id])) < TOLERANCE, f"position {position}"
        # Deep in a flat distribution, logprobs within float noise of the token's may order either way.
        target = row[token_id]
        assert int((row > target + TOLERANCE).sum()) + 1 <= entry.rank <= int((row > target - TOLERANCE).sum()) + 1
        assert len(entry.top) == num_top
        top_values, top_ids = row.topk(num_top)
        # Ties aside, the same alternatives; their logprobs within tolerance.
        for token, logprob in entry.top.items():
            assert abs(logprob - float(row[token])) < TOLERANCE
        if num_top:
            assert abs(min(entry.top.values()) - float(top_values[-1])) < TOLERANCE


def run_outputs(engine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Every output of every request, in order, until the engine is idle."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("engine did not finish")


def test_prompt_logprobs_equal_transformers_log_softmax(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir)
    prompt = random_prompts(1, 40, 40, seed=11)[0]
    engine.add_request("r", prompt, greedy(2, prompt_logprobs=5))
    final = run_outputs(engine)["r"][-1]
    assert_matches_hf(hf_model, prompt, final.prompt_logprobs, num_top=5)


def test_zero_prompt_logprobs_gives_each_prompt_token_only(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir)
    prompt = random_prompts(1, 12, 12, seed=12)[0]
    engine.add_request("r", prompt, greedy(1, prompt_logprobs=0))
    final = run_outputs(engine)["r"][-1]
    assert_matches_hf(hf_model, prompt, final.prompt_logprobs, num_top=0)


def test_without_prompt_logprobs_the_output_has_none(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    engine.add_request("r", random_prompts(1, 12, 12, seed=13)[0], greedy(1))
    assert run_outputs(engine)["r"][-1].prompt_logprobs is None


def test_a_one_token_prompt_has_a_single_none(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    engine.add_request("r", [500], greedy(2, prompt_logprobs=1))
    assert run_outputs(engine)["r"][-1].prompt_logprobs == [None]


def test_batched_with_other_requests(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir, max_num_seqs=8)
    prompts = random_prompts(6, 5, 60, seed=14)
    for i, prompt in enumerate(prompts):
        # Every other request asks for prompt logprobs (different widths); the rest decode alongside.
        params = greedy(4, prompt_logprobs=i % 4) if i % 2 == 0 else greedy(6)
        engine.add_request(f"r{i}", prompt, params)
    outputs = run_outputs(engine)
    for i, prompt in enumerate(prompts):
        final = outputs[f"r{i}"][-1]
        if i % 2 == 0:
            assert_matches_hf(hf_model, prompt, final.prompt_logprobs, num_top=i % 4)
        else:
            assert final.prompt_logprobs is None


def test_across_chunked_prefill(tiny_llama_dir: Path, hf_model) -> None:
    """A 70-token prompt computed 16 tokens a step, next to a decoding request: scored over five steps."""
    engine = make_engine(tiny_llama_dir, max_num_batched_tokens=16)
    prompt, other = random_prompts(2, 70, 70, seed=15)
    engine.add_request("other", other[:10], greedy(30))
    engine.add_request("r", prompt, greedy(2, prompt_logprobs=2))
    final = run_outputs(engine)["r"][-1]
    assert_matches_hf(hf_model, prompt, final.prompt_logprobs, num_top=2)


def test_a_prefix_cache_hit_is_skipped_and_the_prompt_recomputed(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir, block_size=16)
    shared = random_prompts(1, 48, 48, seed=16)[0]
    first, second, third = shared + [101, 102], shared + [103, 104, 105], shared + [106]
    engine.add_request("warm", first, greedy(2))
    run_outputs(engine)
    engine.add_request("scored", second, greedy(2, prompt_logprobs=3))
    scored = run_outputs(engine)["scored"][-1]
    assert scored.num_cached_tokens == 0
    assert_matches_hf(hf_model, second, scored.prompt_logprobs, num_top=3)
    # A request without prompt logprobs still hits the prefix the others cached.
    engine.add_request("plain", third, greedy(2))
    assert run_outputs(engine)["plain"][-1].num_cached_tokens == 48


def test_requests_sharing_a_prefix_in_one_batch(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir, block_size=16)
    shared = random_prompts(1, 32, 32, seed=17)[0]
    prompts = [shared + [200 + i] * (i + 1) for i in range(3)]
    engine.add_request("plain", prompts[0], greedy(3))
    engine.add_request("scored1", prompts[1], greedy(3, prompt_logprobs=1))
    engine.add_request("scored2", prompts[2], greedy(3, prompt_logprobs=1))
    outputs = run_outputs(engine)
    for name, prompt in (("scored1", prompts[1]), ("scored2", prompts[2])):
        assert_matches_hf(hf_model, prompt, outputs[name][-1].prompt_logprobs, num_top=1)


def test_delta_outputs_carry_prompt_logprobs_once_in_the_first_output(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir)
    prompt = random_prompts(1, 20, 20, seed=18)[0]
    engine.add_request("r", prompt, greedy(4, prompt_logprobs=1), output_kind="delta")
    outputs = run_outputs(engine)["r"]
    assert len(outputs) == 4
    assert_matches_hf(hf_model, prompt, outputs[0].prompt_logprobs, num_top=1)
    assert all(output.prompt_logprobs is None for output in outputs[1:])


def test_n_samples_share_one_set_of_prompt_logprobs(tiny_llama_dir: Path, hf_model) -> None:
    engine = make_engine(tiny_llama_dir)
    prompt = random_prompts(1, 20, 20, seed=19)[0]
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=3, seed=1, prompt_logprobs=2))
    final = run_outputs(engine)["r"][-1]
    assert len(final.outputs) == 3
    assert_matches_hf(hf_model, prompt, final.prompt_logprobs, num_top=2)


def test_preempted_requests_score_each_prompt_token_once(tiny_llama_dir: Path, hf_model) -> None:
    """A cache too small for everyone: requests get preempted and recomputed, prompt logprobs stay whole."""
    block_bytes = 16 * 512  # 16 tokens x (K and V x 2 layers x 2 KV heads x 16 dims x 4 bytes)
    engine = make_engine(tiny_llama_dir, block_size=16, kv_cache_memory_bytes=9 * block_bytes,
                         max_num_batched_tokens=32, max_model_len=128)  # fmt: skip
    prompts = random_prompts(3, 60, 60, seed=20)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(40, prompt_logprobs=1))
    outputs = run_outputs(engine)
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert_matches_hf(hf_model, prompt, outputs[f"r{i}"][-1].prompt_logprobs, num_top=1)
