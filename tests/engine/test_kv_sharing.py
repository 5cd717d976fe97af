"""Prefix caching and parallel sampling with copy-on-write."""

from __future__ import annotations

from pathlib import Path

import torch

from replicas import SamplingParams
from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion

TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16


def test_a_prefix_hit_gives_the_same_tokens_and_computes_fewer(tiny_llama_dir: Path) -> None:
    system, tail = random_prompts(2, 100, 100, seed=21)
    prompt = system + tail[:30]
    cold = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    cold.add_request("cold", prompt, greedy(16))
    expected = run_to_completion(cold)["cold"][0]

    warm = make_engine(tiny_llama_dir)
    warm.add_request("first", system + tail[30:40], greedy(4))
    run_to_completion(warm)
    computed_before = warm.stats().num_prompt_tokens
    warm.add_request("hit", prompt, greedy(16))
    hit_output = None
    while warm.has_unfinished():
        for output in warm.step():
            if output.finished:
                hit_output = output
    stats = warm.stats()
    assert hit_output.outputs[0].token_ids == expected
    assert hit_output.num_cached_tokens == 96  # the 6 full blocks of the shared 100-token system prompt
    assert stats.num_prompt_tokens - computed_before == len(prompt) - 96
    assert stats.prefix_cache_hits == 96
    assert stats.prefix_cache_queries == 110 + 130


def test_a_fully_cached_prompt_still_computes_its_last_block(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 64, 64, seed=22)[0]
    engine = make_engine(tiny_llama_dir)
    engine.add_request("a", prompt, greedy(8))
    first = run_to_completion(engine)["a"][0]
    engine.add_request("b", prompt, greedy(8))
    assert run_to_completion(engine)["b"][0] == first
    assert engine.stats().prefix_cache_hits == 48  # 3 of 4 blocks: the last one yields the logits


def test_greedy_parallel_samples_are_identical(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    engine.add_request("n4", random_prompts(1, 37, 37, seed=23)[0], greedy(12, n=4))
    samples = run_to_completion(engine)["n4"]
    assert len(samples) == 4 and all(s == samples[0] for s in samples)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_seeded_parallel_samples_differ_and_are_reproducible(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 37, 37, seed=24)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)

    def sample() -> list[list[int]]:
        engine = make_engine(tiny_llama_dir)
        engine.add_request("n4", prompt, params)
        return run_to_completion(engine)["n4"]

    first = sample()
    assert len({tuple(s) for s in first}) == 4
    assert sample() == first


def test_the_prompt_is_prefilled_once_for_all_samples(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    engine.add_request("n4", random_prompts(1, 50, 50, seed=25)[0], SamplingParams(n=4, max_tokens=3, seed=1))
    run_to_completion(engine)
    assert engine.stats().num_prompt_tokens == 50
    assert engine.stats().num_generation_tokens == 12


def test_copy_on_write_leaves_the_siblings_kv_unchanged(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    prompt = random_prompts(1, 20, 20, seed=26)[0]  # 16 + 4: the second block is shared and partial
    engine.add_request("n2", prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True))
    engine.step()  # prefill once, fork, sample each child's first token
    parent, child = engine.requests["n2"].seqs
    assert parent.block_table == child.block_table
    shared = parent.block_table[1]
    key_caches = engine.model_runner.key_caches
    before = [key_cache[shared].clone() for key_cache in key_caches]

    engine.step()  # both write position 20: one of them copies the shared block first
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert parent.block_table[1] != child.block_table[1]
    assert shared in (parent.block_table[1], child.block_table[1])
    for layer, key_cache in enumerate(key_caches):
        for block_id in (parent.block_table[1], child.block_table[1]):
            assert torch.equal(key_cache[block_id][:4], before[layer][:4])  # the shared prompt tokens
    assert parent.token_ids[20] != child.token_ids[20]
    assert not torch.equal(key_caches[0][parent.block_table[1]][4], key_caches[0][child.block_table[1]][4])
    run_to_completion(engine)


def test_preempting_forked_samples_recomputes_them_correctly(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(4, 40, 60, seed=27)
    params = [SamplingParams(n=3, temperature=1.0, seed=s, max_tokens=40, ignore_eos=True) for s in range(4)]

    def run(**kwargs):
        engine = make_engine(tiny_llama_dir, **kwargs)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", prompt, p)
        return run_to_completion(engine), engine

    roomy, _ = run()
    tight, engine = run(kv_cache_memory_bytes=20 * TINY_BLOCK_BYTES, max_model_len=256)
    assert engine.stats().num_preemptions > 0
    assert tight == roomy


def test_best_of_returns_the_n_most_likely_samples(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 30, 30, seed=28)[0]
    engine = make_engine(tiny_llama_dir)
    engine.add_request("all", prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, logprobs=0,
                                                     ignore_eos=True))
    engine.add_request("best", prompt, SamplingParams(n=2, best_of=4, temperature=1.0, seed=5, max_tokens=8,
                                                      ignore_eos=True))
    outputs = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output
    ranked = sorted(outputs["all"].outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in outputs["best"].outputs] == [c.token_ids for c in ranked]
    assert [c.index for c in outputs["best"].outputs] == [0, 1]


def test_kv_accounting_counts_live_and_allocated_slots(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    engine.add_request("a", random_prompts(1, 20, 20, seed=29)[0], greedy(10))
    engine.step()
    stats = engine.stats()
    assert stats.kv_slots_allocated == 2 * 16  # 20 tokens in two blocks
    assert stats.kv_slots_live == 20
    contiguous = make_engine(tiny_llama_dir, kv_allocation="contiguous", max_model_len=256)
    contiguous.add_request("a", random_prompts(1, 20, 20, seed=29)[0], greedy(10))
    contiguous.step()
    stats = contiguous.stats()
    assert stats.kv_slots_allocated == 256 and stats.kv_slots_live == 20


def test_requests_arriving_together_compute_a_shared_prefix_once(tiny_llama_dir: Path) -> None:
    system = random_prompts(1, 96, 96, seed=30)[0]
    tails = random_prompts(4, 10, 10, seed=31)
    engine = make_engine(tiny_llama_dir)
    for i, tail in enumerate(tails):
        engine.add_request(f"r{i}", system + tail, greedy(4))
    results = run_to_completion(engine)
    # The first request prefills the shared 96 tokens; the others wait a step and reuse its blocks.
    assert engine.stats().num_prompt_tokens == 96 + 4 * 10
    cold = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    for i, tail in enumerate(tails):
        cold.add_request(f"r{i}", system + tail, greedy(4))
    assert run_to_completion(cold) == results
