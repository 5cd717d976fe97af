"""The ingress process loads no torch, and its torch-free tokenizer gives AutoTokenizer's ids and chat prompts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from router.protocol import ChatMessage
from router.tokenization import PromptTokenizer
from tests.conftest import REPO_ROOT, save_gpt2_tokenizer

TEXTS = ["Once upon a time", "  spaces, tabs\tand\nnewlines  ", "naïve café 東京 🙂", "<|im_start|>user", ""]
CONVERSATION = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="What is 2+2?"),
    ChatMessage(role="assistant", content="4"),
    ChatMessage(role="user", content="And 3+3?"),
]


@pytest.mark.parametrize("module", ["router.ingress", "router.request_router"])
def test_importing_the_ingress_loads_no_torch(module: str) -> None:
    """What the ingress replica unpickles (its class, and the request router Serve runs in it) pulls no torch."""
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} loaded torch" if result.returncode == 3 else result.stderr


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2-tokenizer")
    save_gpt2_tokenizer(directory)
    return directory


@pytest.fixture(params=["smollm2", "gpt2"])
def tokenizer_dir(request: pytest.FixtureRequest, default_model_dir: Path) -> Path:
    return default_model_dir if request.param == "smollm2" else request.getfixturevalue("gpt2_tokenizer_dir")


def test_the_ingress_loads_the_class_autotokenizer_loads(tokenizer_dir: Path) -> None:
    ours = PromptTokenizer(str(tokenizer_dir)).tokenizer
    assert type(ours) is type(AutoTokenizer.from_pretrained(tokenizer_dir))


def test_ids_and_decoded_text_match_autotokenizer(tokenizer_dir: Path) -> None:
    ours, reference = PromptTokenizer(str(tokenizer_dir)), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert ours.vocab_size == len(reference)
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids)
    assert [ours.token_text(token) for token in range(300)] == [reference.decode([token]) for token in range(300)]


def test_chat_prompt_matches_autotokenizers_template(default_model_dir: Path) -> None:
    ours, reference = PromptTokenizer(str(default_model_dir)), AutoTokenizer.from_pretrained(default_model_dir)
    conversation = [{"role": message.role, "content": message.text()} for message in CONVERSATION]
    for add_generation_prompt in (True, False):
        text = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.chat_prompt(CONVERSATION, add_generation_prompt) == expected
