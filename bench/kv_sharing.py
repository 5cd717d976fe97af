"""KV cache sharing and paging, measured: prefix caching, parallel sampling, memory efficiency, concurrency.

    python -m bench.kv_sharing [--model DIR] [--quick]

1. Shared prefix: requests sharing a 512-token system prompt plus unique 32-token tails, prefix caching off vs
   on: prefill tokens computed and throughput.
2. Parallel sampling: one `n=4` request vs 4 independent requests of the same prompt (no prefix cache): peak KV
   blocks held.
3. Paged vs contiguous allocation on one request trace and one KV budget: KV memory efficiency (live slots /
   allocated slots) at steady state (steps in which requests wait for memory) and the most sequences running at
   once; the contiguous mode reserves
   max_model_len slots per sequence at admission, as the traditional scheme does.
Results go to bench/results/kv_sharing.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tqdm import tqdm

from replicas import LLMEngine, SamplingParams
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], desc: str) -> dict[str, float]:
    """Run requests to completion, sampling KV usage after every step."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"{desc}-{i}", prompt, params)
    start_tokens = engine.stats().num_prompt_tokens
    peak_used_blocks = 0
    max_running = 0
    efficiency_samples: list[float] = []  # while requests wait for memory: the steady state of a loaded server
    all_samples: list[float] = []
    generated = 0
    start = time.perf_counter()
    with tqdm(total=len(requests), desc=desc, unit="req") as progress:
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished:
                    generated += sum(len(c.token_ids) for c in output.outputs)
                    progress.update()
            stats = engine.stats()
            peak_used_blocks = max(peak_used_blocks, stats.num_total_blocks - stats.num_free_blocks)
            max_running = max(max_running, stats.num_running)
            if stats.num_running and stats.kv_slots_allocated:
                all_samples.append(stats.kv_memory_efficiency)
                if stats.num_waiting:
                    efficiency_samples.append(stats.kv_memory_efficiency)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    return {
        "seconds": elapsed,
        "generated_tokens": generated,
        "tok_s": generated / elapsed,
        "prefill_tokens_computed": stats.num_prompt_tokens - start_tokens,
        "peak_used_blocks": peak_used_blocks,
        "max_running": max_running,
        "mean_kv_memory_efficiency": _mean(efficiency_samples or all_samples),
        "mean_kv_memory_efficiency_all_steps": _mean(all_samples),
        "prefix_cache_hit_tokens": stats.prefix_cache_hits,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    num_shared = 16 if args.quick else 64
    num_trace = 16 if args.quick else 32

    def engine(**kwargs: object) -> LLMEngine:
        kwargs.setdefault("max_model_len", 1024)
        return LLMEngine.from_kwargs(str(args.model), max_num_seqs=64, **kwargs)

    vocab = 49000
    results: dict[str, object] = {}

    # 1. Shared system prompt.
    system = [rng.randrange(100, vocab) for _ in range(512)]
    shared = [
        (system + [rng.randrange(100, vocab) for _ in range(32)],
         SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        for _ in range(num_shared)
    ]
    results["shared_prefix"] = {
        "without_caching": run(engine(enable_prefix_caching=False), shared, "shared prefix, no caching"),
        "with_caching": run(engine(enable_prefix_caching=True), shared, "shared prefix, prefix caching"),
    }

    # 2. Parallel sampling: n=4 sharing the prompt's blocks vs 4 independent requests.
    prompt = [rng.randrange(100, vocab) for _ in range(512)]
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=64, ignore_eos=True)
    results["parallel_sampling"] = {
        "n4": run(engine(enable_prefix_caching=False), [(prompt, sampled.model_copy(update={"n": 4}))], "n=4"),
        "independent": run(
            engine(enable_prefix_caching=False),
            [(prompt, sampled.model_copy(update={"seed": s})) for s in range(4)],
            "4 independent",
        ),
    }

    # 3. Paged vs contiguous on the same trace and budget.
    trace = [
        ([rng.randrange(100, vocab) for _ in range(rng.randint(32, 256))],
         SamplingParams(temperature=0.0, max_tokens=rng.randint(16, 128), ignore_eos=True))
        for _ in range(num_trace)
    ]
    budget = 256 * 16 * 46080  # 256 blocks of the default model (46,080 bytes per token in fp32)
    results["allocation"] = {
        "paged": run(engine(kv_cache_memory_bytes=budget, enable_prefix_caching=False), trace, "paged"),
        "contiguous": run(engine(kv_cache_memory_bytes=budget, kv_allocation="contiguous"), trace, "contiguous"),
    }

    sp, ps, al = results["shared_prefix"], results["parallel_sampling"], results["allocation"]
    print("\n| shared 512-token prefix | prefill tokens computed | tok/s |")
    print("|---|---|---|")
    for name, row in sp.items():
        print(f"| {name} | {row['prefill_tokens_computed']} | {row['tok_s']:.1f} |")
    ratio = sp["with_caching"]["prefill_tokens_computed"] / sp["without_caching"]["prefill_tokens_computed"]
    print(f"prefill computed with caching: {ratio:.1%} of without; throughput x"
          f"{sp['with_caching']['tok_s'] / sp['without_caching']['tok_s']:.2f}")
    saving = 1 - ps["n4"]["peak_used_blocks"] / ps["independent"]["peak_used_blocks"]
    print(f"\nparallel sampling: n=4 peaks at {ps['n4']['peak_used_blocks']} KV blocks, 4 independent requests at "
          f"{ps['independent']['peak_used_blocks']}: {saving:.0%} less KV memory")
    print("\n| allocation | mean KV memory efficiency | most sequences at once | tok/s |")
    print("|---|---|---|---|")
    for name, row in al.items():
        print(f"| {name} | {row['mean_kv_memory_efficiency']:.1%} | {row['max_running']} | {row['tok_s']:.1f} |")
    results["summary"] = {
        "prefill_fraction_with_caching": ratio,
        "parallel_sampling_kv_saving": saving,
        "paged_efficiency": al["paged"]["mean_kv_memory_efficiency"],
        "contiguous_efficiency": al["contiguous"]["mean_kv_memory_efficiency"],
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "kv_sharing.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS_DIR / 'kv_sharing.json'}")


if __name__ == "__main__":
    main()
