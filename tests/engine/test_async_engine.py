"""AsyncEngine: streamed deltas, cancellation frees blocks, refused requests raise to the caller."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from replicas import AsyncEngine, RequestError, SamplingParams
from replicas import async_engine as async_engine_module
from replicas.config import EngineConfig
from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion


@pytest.fixture(scope="module")
def async_engine(tiny_llama_dir: Path):
    engine = AsyncEngine(make_engine(tiny_llama_dir))
    yield engine
    engine.shutdown()


async def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def test_deltas_concatenate_to_the_offline_output(async_engine: AsyncEngine, tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 12, 12, seed=31)[0]
    offline = make_engine(tiny_llama_dir)
    offline.add_request("x", prompt, greedy(15))
    expected = run_to_completion(offline)["x"][0]

    async def collect() -> tuple[list[int], int, str | None]:
        tokens, chunks, reason = [], 0, None
        async for output in async_engine.generate("stream", prompt, greedy(15)):
            chunks += 1
            tokens += output.outputs[0].token_ids
            reason = output.outputs[0].finish_reason
        return tokens, chunks, reason

    tokens, chunks, reason = asyncio.run(collect())
    assert tokens == expected
    assert 1 <= chunks <= 15  # one delta per step, or fewer when the consumer fell behind (merged)
    assert reason == "length"


def test_a_consumer_that_falls_behind_gets_merged_deltas(async_engine: AsyncEngine, tiny_llama_dir: Path) -> None:
    prompt = random_prompts(1, 12, 12, seed=32)[0]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    offline = make_engine(tiny_llama_dir)
    offline.add_request("x", prompt, params)
    final = [output for output in _steps(offline) if output.finished][0].outputs[0]
    expected = final.token_ids

    async def collect() -> list:
        outputs = []
        async for output in async_engine.generate("slow-consumer", prompt, params):
            outputs.append(output)
            if len(outputs) == 1:
                # Until the engine has finished: everything after the first delta piles up in the queue.
                await wait_for(lambda: "slow-consumer" not in async_engine.engine.requests)
        return outputs

    outputs = asyncio.run(collect())
    assert len(outputs) == 2  # the first delta, then all the rest as one
    completions = [output.outputs[0] for output in outputs]
    assert [token for c in completions for token in c.token_ids] == expected
    assert [entry.token_id for c in completions for entry in c.logprobs] == expected
    assert outputs[-1].finished and completions[-1].finish_reason == "length"
    assert "".join(c.text for c in completions) == final.text


def _steps(engine):
    while engine.has_unfinished():
        yield from engine.step()


def test_cancelling_the_consumer_aborts_and_frees_blocks(async_engine: AsyncEngine) -> None:
    total = async_engine.stats().num_total_blocks

    async def consume_then_cancel() -> None:
        async def consume() -> None:
            async for _ in async_engine.generate("cancel-me", random_prompts(1, 50, 50, seed=32)[0], greedy(500)):
                pass

        task = asyncio.create_task(consume())
        await wait_for(lambda: async_engine.stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: async_engine.stats().num_free_blocks == total and async_engine.stats().num_running == 0)

    asyncio.run(consume_then_cancel())
    assert "cancel-me" not in async_engine.engine.requests


def test_a_refused_request_raises_in_the_caller(async_engine: AsyncEngine) -> None:
    async def refused() -> None:
        async for _ in async_engine.generate("bad", [], SamplingParams()):
            pass

    with pytest.raises(RequestError, match="prompt is empty"):
        asyncio.run(refused())
    assert async_engine.is_alive


def test_concurrent_requests_are_batched_together(async_engine: AsyncEngine) -> None:
    prompts = random_prompts(8, 5, 30, seed=33)

    async def run_all() -> list[int]:
        async def one(i: int) -> int:
            count = 0
            async for output in async_engine.generate(f"c{i}", prompts[i], greedy(10)):
                count += len(output.outputs[0].token_ids)
            return count

        steps_before = async_engine.engine.num_steps
        counts = await asyncio.gather(*(one(i) for i in range(8)))
        # 8 requests x 10 tokens in far fewer than 80 steps: they ran in the same batches.
        assert async_engine.engine.num_steps - steps_before < 40
        return counts

    assert asyncio.run(run_all()) == [10] * 8


def test_a_request_queued_while_the_engine_loop_dies_is_answered(tiny_llama_dir: Path) -> None:
    """A request sent while the loop is going down (its command still queued) gets EngineDeadError, not a hang."""
    import threading

    from replicas import EngineDeadError

    engine = make_engine(tiny_llama_dir)
    in_step, release = threading.Event(), threading.Event()

    def dying_step():
        in_step.set()
        release.wait(30)
        raise RuntimeError("simulated crash outside the step's own error handling")

    engine.step = dying_step
    async_engine = AsyncEngine(engine)

    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        async def consume(request_id: str) -> BaseException | None:
            try:
                async for _ in async_engine.generate(request_id, random_prompts(1, 5, 5, seed=2)[0], greedy(4)):
                    pass
            except EngineDeadError as error:
                return error
            return None

        first = asyncio.create_task(consume("running"))
        await wait_for(in_step.is_set)
        queued = asyncio.create_task(consume("queued"))  # the loop is inside the step: this command waits
        await asyncio.sleep(0.1)
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, queued), timeout=30)

    running_error, queued_error = asyncio.run(scenario())
    assert isinstance(running_error, EngineDeadError) and isinstance(queued_error, EngineDeadError)
    assert not async_engine.is_alive
    async_engine.shutdown()


def test_a_config_builds_the_engine_on_the_engine_thread(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load, warm-up and every step then start their OpenMP regions from one thread (one worker pool)."""
    built_on: list[str] = []

    class RecordingEngine(async_engine_module.LLMEngine):
        def __init__(self, config: EngineConfig) -> None:
            built_on.append(threading.current_thread().name)
            super().__init__(config)

    monkeypatch.setattr(async_engine_module, "LLMEngine", RecordingEngine)
    config = EngineConfig(model=str(tiny_llama_dir), kv_cache_memory_bytes=32 * 1024 * 1024, num_threads=2,
                          dtype="float32")  # fmt: skip
    engine = AsyncEngine(config)
    try:
        assert built_on == ["engine-loop"] and isinstance(engine.engine, RecordingEngine)
        prompt = random_prompts(1, 12, 12, seed=5)[0]

        async def collect() -> list[int]:
            tokens: list[int] = []
            async for output in engine.generate("built-here", prompt_token_ids=prompt, params=greedy(6)):
                tokens.extend(output.outputs[0].token_ids)
            return tokens

        offline = make_engine(tiny_llama_dir)
        offline.add_request("offline", prompt_token_ids=prompt, params=greedy(6))
        assert asyncio.run(collect()) == run_to_completion(offline)["offline"][0]
    finally:
        engine.shutdown()


def test_an_engine_that_fails_to_build_raises_in_the_caller(tiny_llama_dir: Path, tmp_path: Path) -> None:
    for path in tiny_llama_dir.iterdir():
        if path.suffix != ".safetensors":  # a model directory without its weights
            shutil.copy(path, tmp_path / path.name)
    threads_before = threading.active_count()
    with pytest.raises(Exception, match="safetensors") as raised:
        AsyncEngine(EngineConfig(model=str(tmp_path), num_threads=1, dtype="float32"))
    assert not isinstance(raised.value, AssertionError)
    assert threading.active_count() == threads_before  # the engine thread is gone too
