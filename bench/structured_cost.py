"""Step cost of structured outputs: a batch of 64 decoding sequences, 0 or 16 of them JSON-schema constrained.

Reports the median decode-step time of each and the constrained batch's throughput relative to the free one.
Run: `python -m bench.structured_cost [--model models/SmolLM2-135M-Instruct] [--steps 24]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from replicas import LLMEngine, SamplingParams
from replicas.sampling_params import StructuredOutputParams

# Long by construction (at least 40 items): no constrained row completes within the measured steps.
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 40}},
          "required": ["items"]}  # fmt: skip


def decode_step_times(engine: LLMEngine, num_constrained: int, batch: int, steps: int) -> list[float]:
    spec = StructuredOutputParams(json_schema=SCHEMA)
    for i in range(batch):
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List {i + 40} fruits as JSON."}], add_generation_prompt=True, tokenize=False
        )
        params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True,
                                structured_output=spec if i < num_constrained else None)  # fmt: skip
        engine.add_request(f"{num_constrained}-{i}", prompt, params)
    while engine.stats().num_running < batch:  # prefill every prompt first
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--constrained", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    engine = LLMEngine.from_kwargs(args.model, max_model_len=512, max_num_seqs=args.batch,
                                   kv_cache_memory_bytes=512 * 2**20)  # fmt: skip
    decode_step_times(engine, args.constrained, 4, 2)  # warm-up: compile the grammar, first forward
    free = statistics.median(decode_step_times(engine, 0, args.batch, args.steps))
    constrained = statistics.median(decode_step_times(engine, args.constrained, args.batch, args.steps))
    print(json.dumps({
        "batch": args.batch, "constrained_rows": args.constrained, "free_step_ms": round(free * 1e3, 1),
        "constrained_step_ms": round(constrained * 1e3, 1), "relative_throughput": round(free / constrained, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
