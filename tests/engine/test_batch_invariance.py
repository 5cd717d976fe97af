"""Greedy tokens of a request do not depend on what else is in the batch, its order, or how prefill is chunked."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion

TARGET = random_prompts(1, 70, 70, seed=40)[0]


def target_tokens(model_dir: Path, num_others: int, shuffle_seed: int, max_num_batched_tokens: int) -> list[int]:
    others = random_prompts(num_others, 1, 120, seed=41 + num_others)
    requests = [("target", TARGET)] + [(f"o{i}", p) for i, p in enumerate(others)]
    random.Random(shuffle_seed).shuffle(requests)
    engine = make_engine(model_dir, max_num_seqs=64, max_num_batched_tokens=max_num_batched_tokens,
                         kv_cache_memory_bytes=64 * 1024 * 1024)
    for request_id, prompt in requests:
        engine.add_request(request_id, prompt, greedy(24))
    return run_to_completion(engine)["target"][0]


@pytest.fixture(scope="module")
def alone(tiny_llama_dir: Path) -> list[int]:
    return target_tokens(tiny_llama_dir, 0, 0, 4096)


@pytest.mark.parametrize(
    "num_others,shuffle_seed,max_num_batched_tokens",
    [(1, 1, 4096), (7, 2, 4096), (31, 3, 64), (63, 4, 4096), (63, 5, 16), (20, 6, 33)],
)
def test_greedy_tokens_are_the_same_alone_and_in_any_batch(
    tiny_llama_dir: Path, alone: list[int], num_others: int, shuffle_seed: int, max_num_batched_tokens: int
) -> None:
    assert target_tokens(tiny_llama_dir, num_others, shuffle_seed, max_num_batched_tokens) == alone
