"""GPT-2, Qwen2 and Mistral: greedy output is token-identical to transformers `generate`, prompts batched together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import build_tiny_gpt2, build_tiny_llama_like
from tests.engine.helpers import assert_greedy_matches_up_to_ties, generate_greedy, greedy, hf_greedy, make_engine, random_prompts, run_to_completion

GPT2_VOCAB_SIZE = 50257
SLIDING_WINDOW = 16


def engine_greedy(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, **engine_kwargs: object
) -> list[list[int]]:
    return generate_greedy(model_dir, prompts, max_tokens, **engine_kwargs)[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("distilgpt2-shaped"), seed=7)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_llama_like(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_llama_like(
        tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=5, sliding_window=SLIDING_WINDOW
    )


def test_gpt2_tokenizer_is_gpt2s_bpe(gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert tokenizer.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert len(tokenizer) == GPT2_VOCAB_SIZE


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_distilgpt2_shaped_gpt2_matches_transformers(gpt2_dir: Path, compile: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    texts = ["Once upon a time", "The capital of France is"]
    prompts = [tokenizer.encode(text) for text in texts] + random_prompts(8, 1, 90, seed=13, vocab_size=GPT2_VOCAB_SIZE)
    expected = hf_greedy(gpt2_dir, prompts, max_new_tokens=16)
    # 64 MiB: a whole n_positions=1024 sequence of this model's KV (36 KiB per token) must fit.
    tokens = engine_greedy(gpt2_dir, prompts, 16, kv_cache_memory_bytes=64 * 1024**2, compile=compile)
    if compile:
        assert_greedy_matches_up_to_ties(gpt2_dir, prompts, tokens, expected)
    else:
        assert tokens == expected


def test_gpt2_untied_head_and_attention_scaled_by_inverse_layer_index_match_transformers(tmp_path: Path) -> None:
    model_dir = build_tiny_gpt2(
        tmp_path / "gpt2-options",
        seed=8,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
    )
    prompts = random_prompts(8, 1, 90, seed=14, vocab_size=GPT2_VOCAB_SIZE)
    assert engine_greedy(model_dir, prompts, 16) == hf_greedy(model_dir, prompts, max_new_tokens=16)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"activation_function": "silu"}, "activation_function 'silu'"),
    ],
)
def test_gpt2_options_it_does_not_reproduce_are_rejected(option: dict, message: str) -> None:
    from transformers import GPT2Config

    from replicas.models.gpt2 import GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, **option)
    with pytest.raises(ValueError, match=message):
        GPT2LMHeadModel(config, 32)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_qwen2_with_qkv_bias_and_tied_embeddings_matches_transformers(qwen2_dir: Path, compile: bool) -> None:
    prompts = random_prompts(10, 1, 90, seed=12)
    tokens, expected = engine_greedy(qwen2_dir, prompts, 24, compile=compile), hf_greedy(qwen2_dir, prompts, 24)
    if compile:
        assert_greedy_matches_up_to_ties(qwen2_dir, prompts, tokens, expected)
    else:
        assert tokens == expected


def test_qwen2_with_sliding_window_layers_is_rejected() -> None:
    from transformers import Qwen2Config

    from replicas.models.qwen2 import Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="use_sliding_window"):
        Qwen2ForCausalLM(config, 32)


def test_mistral_sliding_window_matches_transformers(mistral_dir: Path, tmp_path: Path) -> None:
    # Prompts shorter and longer than the window; 24 new tokens carry every decode across it.
    prompts = random_prompts(10, 1, 80, seed=11)
    assert any(len(p) < SLIDING_WINDOW for p in prompts) and any(len(p) > 3 * SLIDING_WINDOW for p in prompts)
    expected = hf_greedy(mistral_dir, prompts, max_new_tokens=24)
    assert engine_greedy(mistral_dir, prompts, 24) == expected

    # The window matters here: the same weights attending to the whole context give other tokens.
    full_attention_dir = tmp_path / "full-attention"
    shutil.copytree(mistral_dir, full_attention_dir)
    config = json.loads((full_attention_dir / "config.json").read_text())
    (full_attention_dir / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    assert engine_greedy(full_attention_dir, prompts, 24) != expected


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_mistral_chunked_prefill_and_prefix_hits_give_the_same_tokens(mistral_dir: Path, compile: bool) -> None:
    """Compiled too: the sliding window reaches the attention op through the shared layer graph."""
    shared_prefix = random_prompts(1, 48, 48, seed=15)[0]  # three full blocks, three windows
    prompts = [shared_prefix + tail for tail in random_prompts(8, 1, 40, seed=16)]
    expected = hf_greedy(mistral_dir, prompts, max_new_tokens=20)

    # A 20-token budget prefills every prompt in chunks, next to other sequences' decodes.
    engine = make_engine(mistral_dir, max_num_batched_tokens=20, max_num_seqs=4, compile=compile)
    engine.add_request("r0", prompts[0], greedy(20))
    results = run_to_completion(engine)
    for i, prompt in enumerate(prompts[1:], start=1):
        engine.add_request(f"r{i}", prompt, greedy(20))
    results |= run_to_completion(engine)

    tokens = [results[f"r{i}"][0] for i in range(len(prompts))]
    if compile:
        assert_greedy_matches_up_to_ties(mistral_dir, prompts, tokens, expected)
    else:
        assert tokens == expected
    assert engine.stats().prefix_cache_hits == len(shared_prefix) * (len(prompts) - 1)


def test_mistral_triton_backend_gives_the_same_greedy_tokens_as_torch(mistral_dir: Path) -> None:
    """On CPU the Triton kernels run in the interpreter (slow: a small case), sliding window included."""
    prompts = random_prompts(3, 10, 40, seed=17)
    assert engine_greedy(mistral_dir, prompts, 8, attention_backend="triton") == engine_greedy(
        mistral_dir, prompts, 8, attention_backend="torch"
    )


def test_mistral_cpu_fused_backend_gives_the_same_greedy_tokens_as_torch(mistral_dir: Path) -> None:
    """The fused CPU kernel's sliding window, GQA and chunked prefill, end to end."""
    prompts = random_prompts(4, 10, 60, seed=18)
    fused = engine_greedy(mistral_dir, prompts, 12, attention_backend="cpu_fused", max_num_batched_tokens=24)
    assert fused == engine_greedy(mistral_dir, prompts, 12, attention_backend="torch", max_num_batched_tokens=24)
