"""Prompt logprobs through the served app: completions `echo` + `logprobs` in OpenAI's legacy shape (the prompt's
tokens first, the first one null), `max_tokens: 0` with echo, and vLLM's `prompt_logprobs` on completions and chat."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.serve.conftest import ServedApp

PROMPT = [1, 510, 3485, 314, 253, 1245, 29, 2813, 11]  # token ids: no tokenizer round trip in the comparison
GREEDY = {"temperature": 0.0, "ignore_eos": True}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> torch.Tensor:
    """transformers' float32 log-softmax over PROMPT: row `i` scores token `i + 1`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def complete(app: ServedApp, **body: object) -> dict:
    response = httpx.post(f"{app.v1}/completions", json={"model": "tiny", "prompt": PROMPT, **GREEDY, **body},
                          timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_with_logprobs_returns_the_prompt_then_the_completion(tiny_app: ServedApp, reference) -> None:
    plain = complete(tiny_app, max_tokens=3, logprobs=2)["choices"][0]
    echoed = complete(tiny_app, max_tokens=3, logprobs=2, echo=True)["choices"][0]
    logprobs = echoed["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    num_prompt = len(PROMPT)
    assert all(len(logprobs[key]) == num_prompt + 3 for key in logprobs)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position in range(1, num_prompt):
        expected = float(reference[position - 1, PROMPT[position]])
        assert abs(logprobs["token_logprobs"][position] - expected) < TOLERANCE
        assert len(logprobs["top_logprobs"][position]) == 2
    # The completion's part is what the same request without echo returns; its offsets follow the prompt's text.
    assert echoed["text"].endswith(plain["text"])
    assert logprobs["tokens"][num_prompt:] == plain["logprobs"]["tokens"]
    # NOTE: within float noise, not bit for bit: the echo request's logits come from a matmul over more rows.
    assert logprobs["token_logprobs"][num_prompt:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    prompt_text = echoed["text"][: len(echoed["text"]) - len(plain["text"])]
    assert logprobs["text_offset"][num_prompt] == len(prompt_text)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_echo_with_max_tokens_zero_returns_the_prompt_alone(tiny_app: ServedApp, reference) -> None:
    result = complete(tiny_app, max_tokens=0, logprobs=1, echo=True)
    choice = result["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(PROMPT)
    assert choice["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 0
    last = choice["logprobs"]["token_logprobs"][-1]
    assert abs(last - float(reference[len(PROMPT) - 2, PROMPT[-1]])) < TOLERANCE


def test_streamed_echo_with_logprobs_adds_up_to_the_whole_answer(tiny_app: ServedApp) -> None:
    whole = complete(tiny_app, max_tokens=4, logprobs=1, echo=True)["choices"][0]
    tokens, token_logprobs, text = [], [], ""
    body = {"model": "tiny", "prompt": PROMPT, **GREEDY, "max_tokens": 4, "logprobs": 1, "echo": True, "stream": True}
    with httpx.stream("POST", f"{tiny_app.v1}/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"]
                token_logprobs += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"] and token_logprobs == whole["logprobs"]["token_logprobs"]


def test_vllm_prompt_logprobs_on_completions(tiny_app: ServedApp, reference) -> None:
    choice = complete(tiny_app, max_tokens=2, prompt_logprobs=3)["choices"][0]
    prompt_logprobs = choice["prompt_logprobs"]
    assert choice["logprobs"] is None
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for position in range(1, len(PROMPT)):
        entries = prompt_logprobs[position]
        own = entries[str(PROMPT[position])]  # JSON object keys: token ids as strings
        assert abs(own["logprob"] - float(reference[position - 1, PROMPT[position]])) < TOLERANCE
        assert own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        top_ranks = sorted(entry["rank"] for token, entry in entries.items() if token != str(PROMPT[position]))
        assert len(entries) in (3, 4) and top_ranks[:2] == [1, 2]


def test_vllm_prompt_logprobs_on_chat(tiny_app: ServedApp) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2,
            "prompt_logprobs": 0, **GREEDY}  # fmt: skip
    response = httpx.post(f"{tiny_app.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    prompt_logprobs = result["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == result["usage"]["prompt_tokens"]
    assert all(len(entries) == 1 for entries in prompt_logprobs[1:])


def stream_chunks(app: ServedApp, **body: object) -> list[dict]:
    request = {"model": "tiny", "prompt": PROMPT, **GREEDY, **body, "stream": True}
    with httpx.stream("POST", f"{app.v1}/completions", json=request, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip


def test_return_tokens_as_token_ids_names_the_echoed_prompt_by_id(tiny_app: ServedApp) -> None:
    choice = complete(tiny_app, max_tokens=3, logprobs=2, echo=True, prompt_logprobs=1,
                      return_tokens_as_token_ids=True)["choices"][0]  # fmt: skip
    tokens = choice["logprobs"]["tokens"]
    assert tokens[: len(PROMPT)] == [f"token_id:{token}" for token in PROMPT]
    assert all(token.startswith("token_id:") for token in tokens[len(PROMPT):]) and len(tokens) == len(PROMPT) + 3
    assert all(key.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"][1:] for key in top)
    # vLLM's prompt_logprobs are keyed by id already; their decoded_token stays the token's text, as vLLM's.
    assert not any(entry["decoded_token"].startswith("token_id:")
                   for entries in choice["prompt_logprobs"][1:] for entry in entries.values())  # fmt: skip


def test_streamed_echo_with_continuous_usage_and_token_ids(tiny_app: ServedApp) -> None:
    whole = complete(tiny_app, max_tokens=4, logprobs=1, echo=True, return_tokens_as_token_ids=True)
    chunks = stream_chunks(tiny_app, max_tokens=4, logprobs=1, echo=True, return_tokens_as_token_ids=True,
                           stream_options={"include_usage": True, "continuous_usage_stats": True})  # fmt: skip
    assert all(chunk["usage"] is not None for chunk in chunks)
    assert all(chunk["usage"]["prompt_tokens"] == len(PROMPT) for chunk in chunks)
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 4 and chunks[-1]["choices"] == []
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert "".join(choice["text"] for choice in choices) == whole["choices"][0]["text"]
    tokens = [token for choice in choices for token in choice["logprobs"]["tokens"]]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert tokens[: len(PROMPT)] == [f"token_id:{token}" for token in PROMPT]


def test_streamed_echo_of_the_prompt_alone_counts_no_completion_tokens(tiny_app: ServedApp) -> None:
    chunks = stream_chunks(tiny_app, max_tokens=0, logprobs=0, echo=True,
                           stream_options={"include_usage": True, "continuous_usage_stats": True})  # fmt: skip
    assert all(chunk["usage"]["completion_tokens"] == 0 for chunk in chunks)
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    assert sum(len(choice["logprobs"]["tokens"]) for choice in choices) == len(PROMPT)
    assert choices[-1]["finish_reason"] == "length"
