"""`python -m bench.thread_stall`: a step's GEMMs with another process taking a share of a core.

Why a lone stream is slower through Serve than offline with prepacked weights: the model's 211 Linear layers at a
decode step's row counts, plain (MKL on `[out, in]`) and prepacked (oneDNN), on 1 and 2 threads, idle and beside a
process that busy-waits `duty` ms then sleeps 4 ms (as the ingress and proxy relaying tokens do). oneDNN splits a
GEMM statically over its threads: one thread descheduled stalls the whole step.
Results: bench/results/thread_stall.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.machine import machine_description
from replicas.models.packed_linear import PackedLinear

RESULTS = Path(__file__).resolve().parent / "results" / "thread_stall.json"
# SmolLM2-135M's Linear shapes (out, in): q, k, v, o, gate, up, down per layer; 30 layers; the tied output head.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SHAPES = LAYER_SHAPES * 30 + [(49152, 576)]


def step_ms(layers: list[nn.Module], rows: int, repeats: int) -> float:
    """Median time of one pass over every layer at `rows` rows."""
    inputs = {size: torch.randn(rows, size) for size in {576, 1536}}
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def busy_process(duty_ms: float) -> subprocess.Popen:
    code = ("import time\nwhile True:\n    t = time.perf_counter()\n"
            f"    while time.perf_counter() - t < {duty_ms / 1e3}:\n        pass\n    time.sleep(0.004)")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64", help="comma-separated row counts")
    parser.add_argument("--duty-ms", type=float, default=2.0, help="busy ms per 4 ms sleep of the other process")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = [nn.Linear(n_in, n_out, bias=False) for n_out, n_in in SHAPES]
    packed = [PackedLinear(layer.weight, None) for layer in plain]
    print(machine_description(), flush=True)
    rows_list = [int(rows) for rows in args.rows.split(",")]
    results = []
    for rows in rows_list:
        for duty in (0.0, args.duty_ms):
            other = busy_process(duty) if duty else None
            try:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    row = {"rows": rows, "other_busy_ms_per_4ms": duty, "threads": threads,
                           "plain_ms": step_ms(plain, rows, args.repeats),
                           "prepacked_ms": step_ms(packed, rows, args.repeats)}  # fmt: skip
                    results.append(row)
                    other_label = f"busy {duty:g} ms/4 ms" if duty else "none"
                    print(f"rows {rows:3d}  other process {other_label:16s}  {threads} thread(s): "
                          f"plain {row['plain_ms']:6.1f} ms  prepacked {row['prepacked_ms']:6.1f} ms", flush=True)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
    RESULTS.write_text(json.dumps({"machine": machine_description(), "results": results}, indent=1))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
