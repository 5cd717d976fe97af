"""Incremental text: tokenizers' `DecodeStream` (what the output processor uses) gives the same text, token by token,
as the hand-written windowed detokenizer it replaced, on each tokenizer family's kind of tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from replicas.output_processor import DECODE_CONTEXT_TOKENS
from tests.conftest import DEFAULT_MODEL_DIR, save_gpt2_tokenizer

TEXTS = [
    "The capital of France is Paris. Ünïcödé façade, naïve café; 日本語のテキスト and emoji 🙂🚀 too!",
    "def f(x):\n    return x ** 2  # tabs\tand  double  spaces",
    "Ελληνικά, русский, עברית, हिन्दी — mixed scripts…",
]


def windowed_reference(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool) -> list[str]:
    """The engine's previous detokenizer (prefix/read offsets over a short window), one delta per token."""
    token_ids = list(prompt)
    prefix_offset, read_offset = max(len(prompt) - 5, 0), len(prompt)
    deltas = []
    for token in output:
        token_ids.append(token)
        kwargs = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": False}
        prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset], **kwargs)
        new_text = tokenizer.decode(token_ids[prefix_offset:], **kwargs)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            deltas.append("")
            continue
        prefix_offset, read_offset = read_offset, len(token_ids)
        deltas.append(new_text[len(prefix_text) :])
    return deltas


def streamed(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool) -> list[str]:
    """As `OutputProcessor` decodes: a `DecodeStream` started on the prompt's last tokens."""
    stream = DecodeStream(prompt[-DECODE_CONTEXT_TOKENS:], skip_special_tokens)
    return [stream.step(tokenizer.backend_tokenizer, token) or "" for token in output]


def sentencepiece_style_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A Llama-2/Mistral-style tokenizer (Metaspace pre-tokenizer, byte-fallback BPE), trained on the test texts."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])  # fmt: skip
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tokenizer.train_from_iterator(TEXTS * 20 + ["hello world the a of and to in is"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=["smollm2-bpe", "gpt2", "sentencepiece-byte-fallback"])
def tokenizer(request, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "smollm2-bpe":  # the tiny Llama, Qwen2 and Mistral models here use the default model's
        return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        save_gpt2_tokenizer(directory)
        return AutoTokenizer.from_pretrained(directory)
    return sentencepiece_style_tokenizer(directory)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_matches_the_windowed_detokenizer(tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(5)
    specials = sorted(set(tokenizer.all_special_ids))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 8
        for _ in range(6):
            cut = rng.randint(1, len(ids) - 1)
            prompt, output = ids[:cut], ids[cut:]
            if tokenizer.decode(prompt).endswith("\ufffd"):
                continue  # a prompt cut inside a character: see the next test
            if rng.random() < 0.5:  # a special token (EOS, BOS) inside the output
                output = output[:3] + [rng.choice(specials)] + output[3:]
            expected = windowed_reference(tokenizer, prompt, output, skip_special_tokens)
            assert streamed(tokenizer, prompt, output, skip_special_tokens) == expected


def test_merged_deltas_concatenate_and_keep_the_later_finish_state() -> None:
    from replicas.contract import CompletionOutput, RequestOutput, TokenLogprobs, merge_deltas

    first = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "a", [5], logprobs=[TokenLogprobs(5, -0.1, 1, {})]),
                                              CompletionOutput(1, "x", [7])], False, num_cached_tokens=8,
                          prompt_logprobs=[None])  # fmt: skip
    second = RequestOutput("r", None, [], [CompletionOutput(0, "b", [6], "length", None,
                                                            [TokenLogprobs(6, -0.2, 1, {})], -0.3)], True)  # fmt: skip
    merged = merge_deltas(first, second)
    assert merged.finished and merged.prompt_token_ids == [1, 2] and merged.prompt_logprobs == [None]
    assert merged.num_cached_tokens == 8
    by_index = {c.index: c for c in merged.outputs}
    assert (by_index[0].text, by_index[0].token_ids, by_index[0].finish_reason) == ("ab", [5, 6], "length")
    assert [e.token_id for e in by_index[0].logprobs] == [5, 6] and by_index[0].cumulative_logprob == -0.3
    assert (by_index[1].text, by_index[1].token_ids, by_index[1].finish_reason) == ("x", [7], None)
    assert first.outputs[0].token_ids == [5]  # the inputs are not modified
