"""Which request fields this server refuses, and why: OpenAI's and vLLM's fields it knows but does not serve.

A field in neither the request schema (router/protocol.py) nor these tables is answered "unrecognized", so a
misspelt parameter is never silently ignored. The README's "Request fields" table lists every field's treatment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.errors import bad_request
from router.protocol import ChatCompletionRequest, CompletionRequest

# Refused whatever their value (but null, which clients send for "not set"). Key: field; value: why.
REFUSED_CHAT_FIELDS: dict[str, str] = {
    "audio": "audio output is not supported: the served models generate text only",
    "prediction": "predicted outputs are not supported: there is no speculative decoding here",
    "web_search_options": "web search is not supported: the server has no search tool or web access",
    "moderation": "moderation is not supported: there is no moderation model here",
    "verbosity": "verbosity is not supported: no served model has a verbosity control; use max_tokens",
    "prompt_cache_retention": "prompt cache retention cannot be set per request: the prefix cache evicts "
    "least-recently-used blocks when memory runs short",
    "prompt_cache_options": "prompt cache options cannot be set per request: prefix caching is automatic, "
    "block by block",
    # NOTE: OpenAI's deprecated forms of tool calling are refused rather than mapped: `tools` and `tool_choice`
    # (router/tools.py) say the same with one code path, and a refusal tells old clients what to send instead.
    "functions": "`functions` is deprecated by OpenAI and not supported here: send the functions as `tools` "
    "([{\"type\": \"function\", \"function\": {...}}])",
    "function_call": "`function_call` is deprecated by OpenAI and not supported here: use `tool_choice` ('none', "
    "'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}})",
}

# vLLM extras with no implementation here (vLLM's own docs describe them).
REFUSED_VLLM_FIELDS: dict[str, str] = {
    "use_beam_search": "beam search is not supported: sample with n/best_of instead",
    "length_penalty": "length_penalty only applies to beam search, which is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported: use logit_bias",
    "bad_words": "bad_words is not supported: use logit_bias",
    "logits_processors": "custom logits processors are not supported: the server runs no client code",
    "chat_template": "a per-request chat template is not supported: the model's own template is used",
    "chat_template_kwargs": "chat_template_kwargs is not supported",
    "continue_final_message": "continue_final_message is not supported",
    "documents": "documents (RAG templates) are not supported",
    "mm_processor_kwargs": "multimodal inputs are not supported: the served models read text only",
    "cache_salt": "cache_salt is not supported: the prefix cache is shared by all requests",
    "kv_transfer_params": "KV transfer (disaggregated prefill) is not supported",
    "vllm_xargs": "vllm_xargs is not supported",
}

# Values of accepted fields that are refused.
_UNSERVED_SERVICE_TIERS = {"flex", "scale", "priority", "fast"}


def refuse_known_fields(payload: dict[str, Any], refused: Mapping[str, str]) -> dict[str, Any]:
    """A 400 naming the first known-but-unsupported field set in `payload`, with the reason (before validation,
    so the client reads why rather than "unrecognized"); else `payload` without those sent as null ("not set")."""
    for name, reason in refused.items():
        if payload.get(name) is not None:
            raise bad_request(f"{name}: {reason}", name, code="unsupported_field")
    return {name: value for name, value in payload.items() if name not in refused}


def check_field_values(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Accepted fields whose other values this server cannot honour: a 400 naming the field and why."""
    options = request.stream_options
    if options is not None and options.include_obfuscation:
        raise bad_request("stream_options.include_obfuscation: true is not supported: chunks are not padded; put "
                          "TLS in front of the server", "stream_options.include_obfuscation",
                          code="unsupported_field")  # fmt: skip
    if isinstance(request, ChatCompletionRequest):
        if request.store:
            raise bad_request("store: true is not supported: this server keeps no completions; send store=false "
                              "or leave it out", "store", code="unsupported_field")  # fmt: skip
        if request.service_tier in _UNSERVED_SERVICE_TIERS:
            raise bad_request(f"service_tier {request.service_tier!r} is not offered: this server has one tier; "
                              "send 'auto' or 'default', or leave it out", "service_tier",
                              code="unsupported_field")  # fmt: skip
        if request.modalities is not None and "audio" in request.modalities:
            raise bad_request("modalities: audio output is not supported: the served models generate text only; "
                              "send ['text']", "modalities", code="unsupported_field")  # fmt: skip
