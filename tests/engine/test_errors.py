"""Bad configuration and bad requests fail early with typed, explanatory errors; a failing step fails only its requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from replicas import EngineConfig, EngineConfigError, PromptTooLongError, RequestError, SamplingParams
from tests.engine.helpers import greedy, make_engine, random_prompts, run_to_completion


def test_missing_model_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        EngineConfig(model=str(tmp_path / "nope"))


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no config.json"):
        EngineConfig(model=str(tmp_path))


def test_block_size_must_be_a_power_of_two(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValidationError, match="power of two"):
        EngineConfig(model=str(tiny_llama_dir), block_size=12)


def test_unknown_config_field_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValidationError, match="max_num_sequences"):
        EngineConfig(model=str(tiny_llama_dir), max_num_sequences=4)


def test_kv_budget_that_cannot_hold_one_full_sequence_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="max_model_len=1024 sequence needs 64 blocks"):
        make_engine(tiny_llama_dir, kv_cache_memory_bytes=100_000)


def test_max_model_len_beyond_the_model_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="max_position_embeddings 1024"):
        make_engine(tiny_llama_dir, max_model_len=4096)


def test_weights_other_than_safetensors_are_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import shutil

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        make_engine(model_dir)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    return make_engine(tiny_llama_dir, max_model_len=128, max_num_seqs=8)


def test_prompt_too_long_says_both_numbers(engine) -> None:
    with pytest.raises(PromptTooLongError, match="prompt is 120 tokens and max_tokens is 20.*max_model_len 128"):
        engine.add_request("long", [100] * 120, SamplingParams(max_tokens=20))


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ("", SamplingParams(), "prompt is empty"),
        ([], SamplingParams(), "prompt is empty"),
        ([5, 49152], SamplingParams(), "token id 49152 is outside the vocabulary"),
        ([5, -1], SamplingParams(), "token id -1 is outside the vocabulary"),
        ([5], SamplingParams(n=9), "9 samples per request exceed max_num_seqs 8"),
        ([5], SamplingParams(stop=[str(i) for i in range(17)]), "17 stop strings exceed the limit of 16"),
        ([5], SamplingParams(stop_token_ids=[10**6]), "stop token id 1000000 is outside"),
    ],
)
def test_bad_requests_raise_request_errors(engine, prompt, params, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert "bad" not in engine.requests


def test_duplicate_request_id_is_refused(engine) -> None:
    engine.add_request("dup", [5, 6], greedy(2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [5, 6], greedy(2))
    run_to_completion(engine)


def test_an_exception_inside_a_step_fails_its_requests_not_the_engine(tiny_llama_dir: Path, monkeypatch) -> None:
    engine = make_engine(tiny_llama_dir)
    total = engine.stats().num_total_blocks
    engine.add_request("doomed", random_prompts(1, 20, 20, seed=1)[0], SamplingParams(n=2, max_tokens=8))
    original = engine.model_runner.execute

    def explode(scheduled):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.model_runner, "execute", explode)
    outputs = engine.step()
    assert len(outputs) == 1 and outputs[0].finished
    assert "injected fault" in outputs[0].error
    assert [c.finish_reason for c in outputs[0].outputs] == ["abort", "abort"]
    assert engine.stats().num_free_blocks == total and not engine.has_unfinished()

    monkeypatch.setattr(engine.model_runner, "execute", original)
    engine.add_request("healthy", random_prompts(1, 20, 20, seed=2)[0], greedy(5))
    assert len(run_to_completion(engine)["healthy"][0]) == 5
