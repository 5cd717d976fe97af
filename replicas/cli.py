"""Quick offline try: `python -m replicas.cli --model DIR "prompt" ...`."""

from __future__ import annotations

import argparse
import logging
import time

from replicas.default_model import DEFAULT_MODEL_DIR
from replicas.llm import LLM
from replicas.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate offline with continuous batching over a paged KV cache")
    parser.add_argument("prompts", nargs="*", default=["Once upon a time"])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    llm = LLM(args.model)
    prompts: list[str] = args.prompts
    if args.chat:
        tokenizer = llm.engine.tokenizer
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, n=args.n
    )
    start = time.monotonic()
    outputs = llm.generate(prompts, params)
    elapsed = time.monotonic() - start
    num_tokens = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    for prompt, output in zip(args.prompts, outputs):
        for completion in output.outputs:
            print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})\n{completion.text}")
    print(f"\n{num_tokens} tokens in {elapsed:.1f} s ({num_tokens / elapsed:.1f} tok/s)")


if __name__ == "__main__":
    main()
