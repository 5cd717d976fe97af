"""Greedy output is token-identical to transformers `generate`, with each CPU attention backend.

Tests that leave `attention_backend` at `auto` run the fused CPU kernel when it is built (`make setup`); the
parametrized ones name each backend, so the PyTorch backend stays covered too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.helpers import assert_greedy_matches_up_to_ties, generate_greedy, greedy, hf_greedy, make_engine, random_prompts, run_to_completion


CPU_BACKENDS = ["torch", "cpu_fused"]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_llama_batch_of_mixed_prompts_matches_transformers(tiny_llama_dir: Path, backend: str, compile: bool) -> None:
    prompts = random_prompts(16, 1, 90, seed=1)
    expected = hf_greedy(tiny_llama_dir, prompts, max_new_tokens=24)
    tokens, engine = generate_greedy(tiny_llama_dir, prompts, 24, attention_backend=backend, compile=compile)
    assert engine.model_runner.backend.name == backend
    assert engine.model_runner.compiled == compile
    # The fused kernel's extension also runs the norms, RoPE and SiLU·mul, except under compile (Inductor fuses them).
    fused_ops = engine.model_runner.backend.ops if backend == "cpu_fused" and not compile else None
    assert engine.model_runner.model.norm.cpu_ops is fused_ops
    assert engine.model_runner.model.layers[0].mlp.cpu_ops is fused_ops
    if compile:
        assert_greedy_matches_up_to_ties(tiny_llama_dir, prompts, tokens, expected)
    else:
        assert tokens == expected


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cpu_fused_chunked_prefill_next_to_decodes_matches_transformers(tiny_llama_dir: Path, compile: bool) -> None:
    """A 24-token budget cuts prompts into chunks that share steps with other sequences' decodes (every step a
    different token count: the compiled graph's dynamic size)."""
    prompts = random_prompts(6, 30, 120, seed=7)
    expected = hf_greedy(tiny_llama_dir, prompts, max_new_tokens=16)
    tokens, _ = generate_greedy(
        tiny_llama_dir, prompts, 16, attention_backend="cpu_fused", max_num_batched_tokens=24, max_num_seqs=4,
        compile=compile,
    )  # fmt: skip
    if compile:
        assert_greedy_matches_up_to_ties(tiny_llama_dir, prompts, tokens, expected)
    else:
        assert tokens == expected


def test_untied_embeddings_and_llama3_rope_match_transformers(tmp_path: Path, default_model_dir: Path) -> None:
    from tests.conftest import build_tiny_llama

    model_dir = build_tiny_llama(
        tmp_path / "llama3",
        seed=3,
        tie_word_embeddings=False,
        num_heads=6,
        num_kv_heads=2,
        hidden_size=96,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    prompts = random_prompts(4, 60, 150, seed=2)
    expected = hf_greedy(model_dir, prompts, max_new_tokens=16)
    assert generate_greedy(model_dir, prompts, 16)[0] == expected


def test_request_alone_and_inside_a_batch_of_32_give_identical_tokens(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(32, 5, 60, seed=4)
    alone = make_engine(tiny_llama_dir)
    alone.add_request("solo", prompts[7], greedy(20))
    solo = run_to_completion(alone)["solo"][0]

    batched = make_engine(tiny_llama_dir)
    for i, prompt in enumerate(prompts):
        batched.add_request(f"r{i}", prompt, greedy(20))
    assert run_to_completion(batched)["r7"][0] == solo


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_model_matches_transformers(default_model_dir: Path, backend: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    texts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    prompts = [tokenizer.encode(text) for text in texts]
    assert prompts[0] == [6403, 1980, 253, 655]
    expected = hf_greedy(default_model_dir, prompts, max_new_tokens=12)
    assert generate_greedy(default_model_dir, prompts, 12, kv_cache_memory_bytes=256 * 1024 * 1024, max_model_len=2048,
                           attention_backend=backend)[0] == expected


@pytest.mark.slow
def test_default_model_chat_prompts_match_transformers(default_model_dir: Path) -> None:
    """Chat answers end in EOS within a few tokens: both sides stop there, and the tokens through EOS match."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    questions = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    expected = hf_greedy(default_model_dir, prompt_ids, max_new_tokens=40, stop_at_eos=True)
    engine = make_engine(default_model_dir, kv_cache_memory_bytes=256 * 1024 * 1024, max_model_len=2048)
    for i, prompt in enumerate(prompt_ids):
        engine.add_request(f"r{i}", prompt, greedy(40, ignore_eos=False))
    results = run_to_completion(engine)
    assert [results[f"r{i}"][0] for i in range(len(prompt_ids))] == expected
    # The comparison covers the EOS path: at least one answer ends there rather than at max_tokens.
    assert any(len(tokens) < 40 and tokens[-1] == tokenizer.eos_token_id for tokens in expected)


def test_triton_backend_gives_the_same_greedy_tokens_as_torch(tiny_llama_dir: Path) -> None:
    """End to end through the engine; on CPU the Triton kernels run in the interpreter (slow: a small case)."""
    prompts = random_prompts(3, 5, 40, seed=6)

    def generate(backend: str) -> list[list[int]]:
        engine = make_engine(tiny_llama_dir, attention_backend=backend)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(6, n=2 if i == 0 else 1))
        results = run_to_completion(engine)
        return [results[f"r{i}"] for i in range(len(prompts))]

    assert generate("triton") == generate("torch")
