"""Per-token cost of a grammar library's token mask on the default model's tokenizer: xgrammar vs llguidance.

For a JSON schema, each library compiles the grammar, then walks the tokens of a valid instance, computing the
next-token bitmask before each token and accepting it after; the per-token times are what a constrained row adds to
a step on the host. Run: `python -m bench.grammar_mask [--model models/SmolLM2-135M-Instruct]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
        },
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "active", "score", "role"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "active": True, "score": 9.75, "role": "admin",
}  # fmt: skip


def _summary(name: str, compile_s: float, mask_s: list[float], accept_s: list[float]) -> dict:
    return {
        "library": name,
        "compile_ms": round(compile_s * 1e3, 2),
        "tokens": len(mask_s),
        "mask_us_mean": round(statistics.mean(mask_s) * 1e6, 1),
        "mask_us_p50": round(statistics.median(mask_s) * 1e6, 1),
        "mask_us_max": round(max(mask_s) * 1e6, 1),
        "accept_us_mean": round(statistics.mean(accept_s) * 1e6, 1),
    }


def bench_xgrammar(tokenizer: object, vocab_size: int, token_ids: list[int]) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    mask_s, accept_s = [], []
    for token_id in token_ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        mask_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert matcher.accept_token(token_id), token_id
        accept_s.append(time.perf_counter() - start)
    return _summary(f"xgrammar {xgr.__version__ if hasattr(xgr, '__version__') else ''}".strip(), compile_s,
                    mask_s, accept_s)  # fmt: skip


def bench_llguidance(tokenizer: object, vocab_size: int, token_ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    compile_s = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    mask_s, accept_s = [], []
    for token_id in token_ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        mask_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert matcher.consume_token(token_id), (token_id, matcher.get_error())
        accept_s.append(time.perf_counter() - start)
    return _summary(f"llguidance {llguidance.__version__}", compile_s, mask_s, accept_s)


def bench_apply(vocab_size: int, rows: int = 16, batch: int = 64) -> dict:
    """Microseconds to apply random bitmasks to `rows` of a [batch, vocab] float32 logits tensor with xgrammar's
    kernel (what the sampler does), next to a log_softmax of the whole batch for scale."""
    import xgrammar as xgr

    logits = torch.randn(batch, vocab_size)
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
    bitmask.random_(-(2**31), 2**31 - 1)
    indices = list(range(0, batch, batch // rows))
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
    start = time.perf_counter()
    for _ in range(50):
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
    apply_us = (time.perf_counter() - start) / 50 * 1e6
    start = time.perf_counter()
    for _ in range(50):
        torch.log_softmax(logits, dim=-1)
    softmax_us = (time.perf_counter() - start) / 50 * 1e6
    return {f"apply_{rows}_of_{batch}_rows_us": round(apply_us, 1),
            f"log_softmax_{batch}_rows_us": round(softmax_us, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab_size = len(tokenizer)
    text = json.dumps(INSTANCE, separators=(",", ":"))
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    print(f"tokenizer {args.model}: vocab {vocab_size}; instance {len(text)} chars, {len(token_ids)} tokens")
    for bench in (bench_xgrammar, bench_llguidance):
        for run in range(2):  # the first run pays one-time set-up (tokenizer tables)
            result = bench(tokenizer, vocab_size, token_ids)
        print(json.dumps(result))
    print(json.dumps(bench_apply(vocab_size)))


if __name__ == "__main__":
    main()
