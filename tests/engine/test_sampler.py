"""Sampler: masks on known distributions, seeded reproducibility, stop conditions."""

from __future__ import annotations

import math

import numpy as np
from pathlib import Path

import pytest
import torch

from replicas import SamplingParams
from replicas.sampler import Sampler, apply_penalties, kept_counts, rng_key, seeded_uniforms
from replicas.sequence import Sequence
from tests.engine.helpers import make_engine, random_prompts, run_to_completion


def seq_with(params: SamplingParams, key: int | None = None) -> Sequence:
    return Sequence(0, "r", 0, [1, 2, 3], 3, params, rng_key=key)


def kept(probs: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[bool]:
    """Which tokens of `probs` (any order) survive, by the sampler's count over the sorted candidates."""
    sorted_probs, order = torch.tensor([probs]).sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(dim=-1, dtype=torch.float64)
    (count,) = kept_counts(sorted_probs, cdf, torch.tensor([top_k or len(probs)]),
                           torch.tensor([top_p], dtype=torch.float64), torch.tensor([min_p]), len(probs)).tolist()  # fmt: skip
    result = [False] * len(probs)
    for position, token in enumerate(order[0].tolist()):
        result[token] = position < count
    return result


def test_top_k_keeps_exactly_the_k_most_likely_tokens() -> None:
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=2) == [False, True, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # 0.4 + 0.3 = 0.7 < 0.75, so the 0.2 token is needed too; 0.1 is not.
    assert kept([0.1, 0.4, 0.2, 0.3], top_p=0.75) == [False, True, True, True]
    assert kept([0.1, 0.4, 0.2, 0.3], top_p=0.4) == [False, True, False, False]


def test_top_p_applies_to_the_top_k_renormalized() -> None:
    # Within the top 2 (0.4, 0.3 -> 4/7, 3/7), top-p 0.5 keeps only the first.
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=2, top_p=0.5) == [False, True, False, False]


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability() -> None:
    assert kept([0.05, 0.5, 0.2, 0.25], min_p=0.45) == [False, True, False, True]  # threshold 0.225


def test_truncated_sampling_over_a_large_vocabulary_matches_the_kept_distribution() -> None:
    """Candidates come from a top-k narrower than the vocabulary; a top-p reaching past it must still be exact."""
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    vocab_size = 2000
    probs = torch.full((vocab_size,), 0.5 / (vocab_size - 2))
    probs[7], probs[11] = 0.3, 0.2  # two likely tokens, then a flat tail holding half the mass
    logits = torch.log(probs)[None, :].repeat(3000, 1)
    tokens = torch.tensor(sampler(logits, [seq_with(SamplingParams(top_p=0.4)) for _ in range(3000)]).token_ids)
    assert set(tokens.tolist()) <= {7, 11} and abs(float((tokens == 7).float().mean()) - 0.6) < 0.04
    tokens = torch.tensor(sampler(logits, [seq_with(SamplingParams(top_p=0.9)) for _ in range(3000)]).token_ids)
    in_tail = (tokens != 7) & (tokens != 11)
    assert abs(float(in_tail.float().mean()) - 0.4 / 0.9) < 0.04  # the tail is sampled, beyond any top-k width


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # flat, moderate and peaked distributions
def test_top_p_thresholds_keep_the_same_tokens_as_sorting(scale: float) -> None:
    from replicas.sampler import top_p_thresholds

    generator = torch.Generator().manual_seed(int(scale * 100))
    probs = torch.softmax(torch.randn(64, 3000, generator=generator) * scale, dim=-1)
    top_p = torch.rand(64, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    thresholds = top_p_thresholds(probs, probs.max(dim=-1).values, top_p, max_in_bucket=3000)
    sorted_probs, _ = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(dim=-1, dtype=torch.float64)
    counts = kept_counts(sorted_probs, cdf, torch.full((64,), 3000), top_p, torch.zeros(64), 3000)
    assert ((probs >= thresholds[:, None]).sum(dim=-1) == counts).all()


def test_seeded_uniforms_depend_on_key_and_position_only() -> None:
    keys = np.array([rng_key(42, 0), rng_key(42, 1), rng_key(42, 0)], dtype=np.uint64)
    draws = seeded_uniforms(keys, np.array([0, 0, 1], dtype=np.uint64))
    assert draws[0] != draws[1] and draws[0] != draws[2]
    assert seeded_uniforms(keys[:1], np.array([0], dtype=np.uint64))[0] == draws[0]
    uniforms = seeded_uniforms(np.full(20000, rng_key(7, 0), dtype=np.uint64), np.arange(20000, dtype=np.uint64))
    assert ((uniforms >= 0) & (uniforms < 1)).all() and abs(uniforms.mean() - 0.5) < 0.01


def test_sampling_follows_the_distribution() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = torch.log(probs)[None, :].repeat(4000, 1)
    params = SamplingParams(temperature=1.0)
    tokens = sampler(logits, [seq_with(params) for _ in range(4000)]).token_ids
    frequencies = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(frequencies, probs, atol=0.03)


def test_greedy_rows_take_the_argmax_even_beside_random_rows() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    out = sampler(logits, [seq_with(SamplingParams(temperature=0.0)), seq_with(SamplingParams())])
    assert out.token_ids[0] == 1


def test_greedy_ties_go_to_the_first_maximum_as_transformers_argmax() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 49152), generator=generator).float()  # every row full of ties
    logits[5, 7] = float("nan")  # NaN wins, as in argmax
    out = sampler(logits, [seq_with(SamplingParams(temperature=0.0)) for _ in range(64)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    def draw(batch_size: int) -> list[int]:
        sampler = Sampler(seed=batch_size, device=torch.device("cpu"))
        seeded = seq_with(SamplingParams(temperature=1.0, seed=1234), rng_key(1234, 0))
        others = [seq_with(SamplingParams(temperature=1.0)) for _ in range(batch_size)]
        target_row = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
        logits = torch.cat([torch.randn(batch_size, 50), target_row])
        tokens = []
        for _ in range(20):
            tokens.append(sampler(logits, others + [seeded]).token_ids[-1])
            seeded.token_ids.append(tokens[-1])  # the next draw is the stream's next position
        return tokens

    assert draw(0) == draw(5) == draw(17)


def test_penalties_lower_repeated_tokens() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    seq = Sequence(0, "r", 0, [1, 2, 3, 3, 3], 2, SamplingParams(temperature=0.0, frequency_penalty=2.0))
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    # Token 3 was generated 3 times: 5 - 3*2 = -1 < 0.
    assert sampler(logits, [seq]).token_ids == [0]
    # Repetition penalty, as transformers applies it: positive logits divided, negative ones multiplied.
    seq = Sequence(0, "r", 0, [3, 1], 1, SamplingParams(temperature=0.0, repetition_penalty=10.0))
    penalized = apply_penalties(torch.tensor([[0.0, -1.0, 0.7, 5.0]]), [seq])
    assert torch.allclose(penalized, torch.tensor([[0.0, -10.0, 0.7, 0.5]]))


def test_same_seed_same_tokens_in_the_engine(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 10, 10, seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=20, ignore_eos=True)

    def sample(batch_with_others: bool) -> list[int]:
        engine = make_engine(tiny_llama_dir)
        if batch_with_others:
            for i, other in enumerate(random_prompts(5, 5, 30, seed=9)):
                engine.add_request(f"o{i}", other, SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True))
        engine.add_request("target", prompt, params)
        return run_to_completion(engine)["target"][0]

    alone = sample(False)
    assert sample(True) == alone
    engine = make_engine(tiny_llama_dir)
    engine.add_request("other-seed", prompt, params.model_copy(update={"seed": 43}))
    assert run_to_completion(engine)["other-seed"][0] != alone


def test_stop_string_across_token_boundaries_is_cut_from_the_text(default_model_dir: Path) -> None:
    engine = make_engine(default_model_dir, kv_cache_memory_bytes=64 * 1024 * 1024, max_model_len=512)
    tokenizer = engine.tokenizer
    prompt = "The capital of France is"
    engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    full = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                full = output.outputs[0]
    assert full is not None and len(full.text) > 12
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    boundary = len(pieces[0]) + len(pieces[1])
    stop = full.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop not in full.text[: boundary - 2]
    engine.add_request("stopped", prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]))
    stopped = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                stopped = output.outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[: boundary - 2]


def test_stop_token_ids_and_max_tokens_end_a_request(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 10, 10, seed=5)[0]
    engine = make_engine(tiny_llama_dir)
    engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    free = None
    while engine.has_unfinished():
        for output in engine.step():
            free = output.outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_token = free.token_ids[4]
    first = free.token_ids.index(stop_token)
    engine.add_request("stop", prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_token]))
    stopped = None
    while engine.has_unfinished():
        for output in engine.step():
            stopped = output.outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_token
    assert stopped.token_ids == free.token_ids[: first + 1]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                         ("max_tokens", 0), ("n", 0), ("logprobs", 21), ("presence_penalty", 3.0)])
def test_out_of_range_sampling_parameters_are_refused(field: str, value: float) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


def test_logit_bias_bans_and_forces_tokens(tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 10, 10, seed=6)[0]
    engine = make_engine(tiny_llama_dir)
    engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    free = run_to_completion(engine)["free"][0]
    engine.add_request("banned", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                        logit_bias={free[0]: -100.0}))
    assert run_to_completion(engine)["banned"][0][0] != free[0]
    engine.add_request("forced", prompt, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=1,
                                                        logit_bias={777: 100.0}))
    assert run_to_completion(engine)["forced"][0] == [777] * 6
    with pytest.raises(ValueError, match="within \\[-100, 100\\]"):
        SamplingParams(logit_bias={5: 101.0})


def test_repetition_penalty_matches_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=generator)
    token_ids = [3, 7, 7, 12, 40]
    seq = Sequence(0, "r", 0, token_ids, 2, SamplingParams(temperature=0.0, repetition_penalty=1.3))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([token_ids]), logits.clone())
    assert torch.allclose(apply_penalties(logits, [seq]), expected)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.zeros(1, 6)
    seq = Sequence(0, "r", 0, [5, 1, 1, 2], 1, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty, over generated tokens only.
    expected = torch.tensor([[0.0, -(2 * 0.25 + 0.5), -(0.25 + 0.5), 0.0, 0.0, 0.0]])
    assert torch.allclose(apply_penalties(logits, [seq]), expected)
