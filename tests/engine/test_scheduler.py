"""Continuous batching behaviour: preemption, chunked prefill, block reuse, abort, admission limits."""

from __future__ import annotations

from pathlib import Path

from replicas.scheduler import Scheduler
from tests.engine.helpers import generate_greedy, greedy, make_engine, random_prompts

TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # layers x kv heads x head_dim x fp32 x block_size, keys and values


run = generate_greedy


def test_preemption_under_a_tiny_kv_budget_leaves_outputs_unchanged(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(8, 40, 70, seed=11)
    reference, _ = run(tiny_llama_dir, prompts, 40)
    outputs, engine = run(
        tiny_llama_dir, prompts, 40, kv_cache_memory_bytes=20 * TINY_BLOCK_BYTES, max_model_len=256
    )
    stats = engine.stats()
    assert stats.num_total_blocks == 20
    assert stats.num_preemptions > 0
    assert outputs == reference
    assert stats.num_free_blocks == stats.num_total_blocks


def test_chunked_prefill_gives_the_same_tokens_as_one_shot_prefill(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(6, 100, 200, seed=12)
    one_shot, _ = run(tiny_llama_dir, prompts, 12, max_num_batched_tokens=4096)
    chunked, engine = run(tiny_llama_dir, prompts, 12, max_num_batched_tokens=48, enable_prefix_caching=False)
    assert chunked == one_shot
    assert engine.stats().num_steps > 200 // 48  # really chunked


def test_decodes_keep_running_while_a_long_prompt_is_prefilled_in_chunks(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, max_num_batched_tokens=32)
    engine.add_request("short", random_prompts(1, 5, 5, seed=1)[0], greedy(30))
    engine.step()  # the short prompt is prefilled
    engine.add_request("long", random_prompts(1, 300, 300, seed=2)[0], greedy(1))
    short_progress = []
    while engine.has_unfinished():
        engine.step()
        long_seq = engine.requests["long"].seqs[0] if "long" in engine.requests else None
        if long_seq is not None and long_seq.num_computed_tokens < 300:
            short_progress.append(engine.requests["short"].seqs[0].num_output_tokens)
    # The short request gained a token in every step the long prompt was still being prefilled.
    assert len(short_progress) >= 300 // 32
    assert all(b == a + 1 for a, b in zip(short_progress, short_progress[1:]))


def test_a_finished_sequence_frees_its_blocks_for_others(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, kv_cache_memory_bytes=20 * TINY_BLOCK_BYTES, max_model_len=256,
                         enable_prefix_caching=False)
    first = random_prompts(1, 200, 200, seed=5)[0]
    engine.add_request("first", first, greedy(4))
    engine.add_request("second", random_prompts(1, 200, 200, seed=6)[0], greedy(4))
    first_blocks: set[int] = set()
    second_admitted_at = None
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        if "first" in engine.requests:
            first_blocks |= set(engine.requests["first"].seqs[0].block_table)
        second = engine.requests.get("second")
        if second_admitted_at is None and second is not None and second.seqs[0].block_table:
            second_admitted_at = step
            assert "first" not in engine.requests  # it could only start once the first one finished
            assert first_blocks & set(second.seqs[0].block_table)  # on the blocks the first one freed
    assert second_admitted_at is not None
    assert engine.stats().num_preemptions == 0


def test_abort_frees_every_block(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    total = engine.stats().num_total_blocks
    for i, prompt in enumerate(random_prompts(6, 20, 80, seed=7)):
        engine.add_request(f"r{i}", prompt, greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < total
    for i in range(6):
        assert engine.abort(f"r{i}")
    assert not engine.abort("r0")  # already gone
    stats = engine.stats()
    assert stats.num_free_blocks == total and stats.num_running == 0 and stats.num_waiting == 0
    assert not engine.has_unfinished()
    assert engine.step() == []


def test_max_num_seqs_bounds_the_batch(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir, max_num_seqs=3)
    for i, prompt in enumerate(random_prompts(7, 5, 10, seed=8)):
        engine.add_request(f"r{i}", prompt, greedy(5))
    sizes = []
    scheduler: Scheduler = engine.scheduler
    while engine.has_unfinished():
        engine.step()
        sizes.append(len(scheduler.running))
    assert max(sizes) == 3
