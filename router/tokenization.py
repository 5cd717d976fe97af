"""Prompts to token ids with the model's own tokenizer and chat template, loaded without torch.

NOTE: `transformers.AutoTokenizer` imports torch (through the model configuration classes it consults); the
tokenizer classes themselves do not. The ingress picks the class the way AutoTokenizer does for a local directory,
so its token ids and chat renderings match the engine's (tests/serve/test_tokenization.py compares them).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import transformers
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from router.errors import bad_request
from router.protocol import ChatMessage
from router.tools import template_conversation, with_tool_instructions

# `tokenizer_class` values that name no model-specific class: AutoTokenizer loads tokenizer.json as it is.
_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizer", "PreTrainedTokenizerFast", "PythonBackend"}


def tokenizer_class_for(tokenizer_dir: str) -> type[PreTrainedTokenizerBase]:
    """The class AutoTokenizer loads for this directory: `tokenizer_config.json`'s `tokenizer_class` when
    transformers defines it (v5 names, with or without the old `Fast` suffix), else the generic tokenizers backend."""
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    name = (config.get("tokenizer_class") or "TokenizersBackend").removesuffix("Fast")
    if name in _GENERIC_TOKENIZER_CLASSES:
        return TokenizersBackend
    # NOTE: transformers' lazy module imports only `transformers.models.<family>.tokenization_<family>` here.
    found = getattr(transformers, name, None)
    return found if isinstance(found, type) and issubclass(found, TokenizersBackend) else TokenizersBackend


class PromptTokenizer:
    """Tokenizes in the ingress, so replicas get token ids and the router can hash prefixes."""

    def __init__(self, tokenizer_dir: str) -> None:
        self.tokenizer = tokenizer_class_for(tokenizer_dir).from_pretrained(tokenizer_dir)
        self.vocab_size = len(self.tokenizer)
        template = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else ""
        # NOTE: a template that never mentions them ignores `tools=` and an assistant's `tool_calls`
        # (SmolLM2's, say): the ingress then shows them to the model as text (router/tools.py).
        self.template_renders_tools = "tools" in template
        self.template_renders_tool_calls = "tool_calls" in template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Same call as the engine's own `add_request(prompt=...)`, so both paths see the same ids."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        """A prompt as text (for `echo`), special tokens included as the client sent them."""
        return self.tokenizer.decode(token_ids)

    def completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """A completions `prompt` (string, strings, token ids, or lists of token ids) as one id list per prompt;
        `add_special_tokens` applies to text (token ids are taken as they are)."""
        if isinstance(prompt, str):
            prompts: list[list[int]] = [self.encode(prompt, add_special_tokens)]
        elif not prompt:
            raise bad_request("prompt is empty: give a non-empty string, strings, or token ids", "prompt")
        elif isinstance(prompt[0], str):
            prompts = [self.encode(text, add_special_tokens) for text in prompt]  # type: ignore[arg-type]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(ids) for ids in prompt]  # type: ignore[union-attr]
        for ids in prompts:
            if not ids:
                raise bad_request("a prompt is empty: every prompt needs at least one token", "prompt")
            self.check_vocabulary(ids, "prompt")
        return prompts

    def check_vocabulary(self, token_ids: list[int], param: str) -> None:
        bad = next((token for token in token_ids if not 0 <= token < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)

    def chat_prompt(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        template_variables: dict[str, str] | None = None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """The conversation rendered with the model's chat template, then tokenized. The template adds the
        special tokens it wants, so `add_special_tokens` (vLLM's default: False) would add a second BOS.
        `template_variables` (`reasoning_effort`) reach a template that reads them; others ignore them. `tools`
        (OpenAI's tool definitions) go to the template, or into the system message when it shows none."""
        if self.tokenizer.chat_template is None:
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        conversation = template_conversation(messages, self.template_renders_tool_calls)
        if tools and not self.template_renders_tools:
            conversation, tools = with_tool_instructions(conversation, tools), None
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
                **(template_variables or {}),
            )
        except Exception as error:  # noqa: BLE001 — a template can refuse a conversation (e.g. role order)
            raise bad_request(f"the chat template refused these messages: {error}", "messages") from error
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    @lru_cache(maxsize=65536)  # noqa: B019 — one tokenizer per process; the cache lives as long as it does
    def token_text(self, token_id: int) -> str:
        """One token as text, for logprobs (a lone byte of a multi-byte character decodes to U+FFFD)."""
        return self.tokenizer.decode([token_id])

