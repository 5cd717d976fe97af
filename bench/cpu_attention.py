"""CPU attention ops alone, PyTorch backend vs the fused kernel: `python -m bench.cpu_attention`.

One layer of the default model's geometry (9 query heads, 3 KV heads, head_dim 64, block 16, fp32) on a paged cache
with randomly permuted blocks. Each case is timed `--repeats` times (median, p25-p75; the machine may be shared, so
medians, not minima). The PyTorch backend reuses its padding plan across calls, as a step's layers do; its plan build
(once per step) is not counted. `write_kv_cache` is timed for the step's new rows. Results: bench/results/cpu_attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.machine import cpu_flags, cpu_model
from bench.timing import timed
from kernels.cpu_fused_backend import CpuFusedAttentionBackend
from kernels.torch_backend import TorchAttentionBackend
from tests.kernels.paged_batches import BatchSpec, make_batch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CASES = {
    "decode batch 64, context 300": tuple((300 + i % 17, 1) for i in range(64)),
    "decode batch 64, context 1000": tuple((1000 + i % 17, 1) for i in range(64)),
    "mixed: prefill chunk 512 + 32 decodes ctx 300": ((512, 512),) + tuple((300 + i, 1) for i in range(32)),
    "mixed: 4 chunks of 256 after 256 cached + 16 decodes": ((512, 256),) * 4 + tuple((300 + i, 1) for i in range(16)),
    "prefill 2 x 1024": ((1024, 1024),) * 2,
}


def summary(times: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(times, n=4)
    return {"median_ms": 1000 * statistics.median(times), "p25_ms": 1000 * quartiles[0], "p75_ms": 1000 * quartiles[2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    fused, reference = CpuFusedAttentionBackend(), TorchAttentionBackend()
    print(f"CPU: {cpu_model()}; flags {' '.join(cpu_flags())}; {torch.get_num_threads()} threads; "
          f"fused kernel SIMD path {fused.simd_path}; median of {args.repeats} (p25-p75)")  # fmt: skip
    rows = []
    with torch.inference_mode():
        for name, seqs in CASES.items():
            batch = make_batch(BatchSpec(seqs=seqs, num_kv_heads=3, group=3, head_dim=64, block_size=16))
            row: dict[str, object] = {"case": name, "new_tokens": int(batch.query.shape[0])}
            for label, backend in (("torch", reference), ("cpu_fused", fused)):
                row[f"attention_{label}"] = summary(timed(lambda: backend.paged_attention(*batch.attention_args()), args.repeats))
                write = lambda: backend.write_kv_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,  # noqa: E731
                                                       batch.slot_mapping)  # fmt: skip
                row[f"write_kv_{label}"] = summary(timed(write, args.repeats))
            rows.append(row)
    print("\n| case | paged_attention torch ms | cpu_fused ms | speed-up | write_kv_cache torch ms | cpu_fused ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        t, f = row["attention_torch"], row["attention_cpu_fused"]
        wt, wf = row["write_kv_torch"], row["write_kv_cpu_fused"]
        print(f"| {row['case']} | {t['median_ms']:.2f} ({t['p25_ms']:.2f}-{t['p75_ms']:.2f}) | "
              f"{f['median_ms']:.2f} ({f['p25_ms']:.2f}-{f['p75_ms']:.2f}) | {t['median_ms'] / f['median_ms']:.1f}x | "
              f"{wt['median_ms']:.3f} | {wf['median_ms']:.3f} |")  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "cpu_attention.json"
    path.write_text(json.dumps({"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
                                "repeats": args.repeats, "rows": rows}, indent=2))  # fmt: skip
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
