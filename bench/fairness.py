"""Short-request time to first token under a flood of long prompts: FCFS vs the fair policy.

    python -m bench.fairness [--model DIR] [--quick]

Long prompts arrive first; short requests keep arriving while the long ones are prefilled. Under FCFS a short
request waits for every long prefill queued before it; the fair policy admits short prompts first and caps each
long prefill's chunk per step while others compete. Results go to bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from replicas import LLMEngine, SamplingParams
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(model: Path, policy: str, num_long: int, num_short: int, seed: int) -> dict[str, float]:
    engine = LLMEngine.from_kwargs(str(model), scheduling_policy=policy, max_num_batched_tokens=512,
                                   long_prefill_token_threshold=128, max_model_len=2048)
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    arrival: dict[str, float] = {}
    first_token: dict[str, float] = {}

    def add(request_id: str, length: int) -> None:
        engine.add_request(request_id, [rng.randrange(100, 49000) for _ in range(length)], params)
        arrival[request_id] = time.perf_counter()

    for i in range(num_long):
        add(f"long{i}", 1024)
    shorts_added = 0
    step = 0
    start = time.perf_counter()
    with tqdm(total=num_long + num_short, desc=policy, unit="req") as progress:
        while engine.has_unfinished() or shorts_added < num_short:
            if shorts_added < num_short and step % 2 == 0:  # a short request every other step
                add(f"short{shorts_added}", rng.randint(8, 32))
                shorts_added += 1
            for output in engine.step():
                first_token.setdefault(output.request_id, time.perf_counter())
                if output.finished:
                    progress.update()
            step += 1
    ttft = {rid: first_token[rid] - arrival[rid] for rid in arrival}
    shorts = [v for rid, v in ttft.items() if rid.startswith("short")]
    longs = [v for rid, v in ttft.items() if rid.startswith("long")]
    return {
        "short_ttft_p50_s": statistics.median(shorts),
        "short_ttft_p95_s": percentile(shorts, 0.95),
        "long_ttft_mean_s": statistics.mean(longs),
        "total_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    num_long, num_short = (3, 6) if args.quick else (6, 12)
    results = {policy: run(args.model, policy, num_long, num_short, seed=0) for policy in ("fcfs", "fair")}
    print("\n| policy | short TTFT p50 (s) | short TTFT p95 (s) | long TTFT mean (s) | total (s) |")
    print("|---|---|---|---|---|")
    for policy, row in results.items():
        print(f"| {policy} | {row['short_ttft_p50_s']:.2f} | {row['short_ttft_p95_s']:.2f} | "
              f"{row['long_ttft_mean_s']:.2f} | {row['total_s']:.1f} |")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "fairness.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS_DIR / 'fairness.json'}")


if __name__ == "__main__":
    main()
