"""Helpers for engine tests: HF reference generation and seeded prompts."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from replicas import LLMEngine, SamplingParams


def random_prompts(count: int, min_len: int, max_len: int, seed: int, vocab_size: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: the special tokens (bos/eos/...) live there.
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_new_tokens: int, *, stop_at_eos: bool = False
) -> list[list[int]]:
    """transformers `generate`, greedy, one prompt at a time (no padding effects).

    By default EOS is treated as the engine's `ignore_eos` treats it: picked when it is the argmax, then generation
    goes on past it. NOTE: not `min_new_tokens`, which suppresses EOS and so picks the runner-up where EOS wins.
    With `stop_at_eos` generation ends at EOS, which is included, as the engine's does without `ignore_eos`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if not stop_at_eos:
        # Without an EOS id, generate adds no EOS stopping criterion and leaves the logits alone.
        model.generation_config.eos_token_id = None
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            results.append(out[0, len(prompt) :].tolist())
    return results


def run_to_completion(engine: LLMEngine, max_steps: int = 100_000) -> dict[str, list[list[int]]]:
    """Step until idle; returns each request's completions' token ids by request id."""
    results: dict[str, list[list[int]]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        for output in engine.step():
            if output.finished:
                results[output.request_id] = [c.token_ids for c in output.outputs]
    raise AssertionError(f"engine did not finish within {max_steps} steps")


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    """Greedy, past EOS unless `ignore_eos=False` is given: random test models emit EOS at arbitrary points."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **{"ignore_eos": True, **kwargs})


def make_engine(model_dir: Path, **kwargs: object) -> LLMEngine:
    kwargs.setdefault("kv_cache_memory_bytes", 32 * 1024 * 1024)
    kwargs.setdefault("num_threads", 2)
    # Pinned: the tests compare with transformers in fp32, and `auto` means bf16 on CPUs with bf16 instructions.
    kwargs.setdefault("dtype", "float32")
    return LLMEngine.from_kwargs(str(model_dir), **kwargs)


def generate_greedy(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, **engine_kwargs: object
) -> tuple[list[list[int]], LLMEngine]:
    """All prompts submitted together, then stepped to completion: each prompt's tokens in order, and the engine."""
    engine = make_engine(model_dir, **engine_kwargs)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens))
    results = run_to_completion(engine)
    return [results[f"r{i}"][0] for i in range(len(prompts))], engine


# fp32 logits of ~10 are ~1e-6 apart per ulp: the compiled forward (fused reductions, reassociated) may break a tie
# this close the other way from transformers, and then the sequence continues from another token.
NEAR_TIE = 1e-4


def assert_greedy_matches_up_to_ties(
    model_dir: Path, prompts: list[list[int]], tokens: list[list[int]], expected: list[list[int]]
) -> None:
    """Each output equals transformers', or first differs where transformers' top two logits are within NEAR_TIE
    (nothing after that point is compared). Exact equality is asserted for eager forwards elsewhere."""
    from transformers import AutoModelForCausalLM

    model = None
    for prompt, got, want in zip(prompts, tokens, expected, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None:
            assert len(got) == len(want)
            continue
        model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + want[:first]])).logits[0, -1]
        top = logits.topk(2).values
        gap = float(top[0] - top[1])
        assert gap < NEAR_TIE, f"differs at output token {first} where transformers' top-2 gap is {gap:.2e}"
        assert got[first] == int(logits.topk(2).indices[1]), "the differing token is not the runner-up"
