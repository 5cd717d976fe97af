"""The default model's decoder GEMMs at a step's row counts, per fp32 weight layout: plain (MKL on `[out, in]`),
oneDNN-packed (the default before) and MKL-packed (`PackedLinear`'s fp32 default).

    python -m bench.packed_gemm [--model DIR] [--rows 1,8,16,32,64,128,512,2048] [--threads N]

All 30 layers' four GEMMs (QKV, output, gate-up, down) with random weights of the model's shapes, so the weights
stream from memory as in a step (~400 MiB, more than the caches); best of a few passes each; the fraction of the
fp32 GEMM peak measured in the same run. Writes bench/results/packed_gemm.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig

from bench.machine import cpu_flags, cpu_model
from bench.offline import measure_gemm_peak
from bench.timing import best_seconds
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def layer_shapes(model_dir: Path) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of one decoder layer's GEMMs, and the layer count."""
    config = AutoConfig.from_pretrained(model_dir)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    attention_out = config.num_attention_heads * head_dim
    return [(hidden, qkv), (attention_out, hidden), (hidden, 2 * inter), (inter, hidden)], config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rows", default="1,8,16,32,64,128,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, num_layers = layer_shapes(args.model)
    weights = [[torch.randn(out, inp) * 0.02 for inp, out in shapes] for _ in range(num_layers)]
    layouts = {
        "plain": [[(w,) for w in layer] for layer in weights],
        "onednn": [[(torch.ops.mkldnn._reorder_linear_weight(w, 64),) for w in layer] for layer in weights],
        "mkl": [[(torch.ops.mkl._mkl_reorder_linear_weight(w, 64), torch.zeros(1).expand(w.shape)) for w in layer]
                for layer in weights],  # fmt: skip
    }

    def run(layout: str, x: dict[int, torch.Tensor], rows: int) -> None:
        for layer in layouts[layout]:
            for (inp, _), packed in zip(shapes, layer):
                if layout == "plain":
                    torch.nn.functional.linear(x[inp], packed[0])
                elif layout == "onednn":
                    torch.ops.mkldnn._linear_pointwise(x[inp], packed[0], None, "none", [], "")
                else:  # the packed path for any row count: see replicas/models/packed_linear.py
                    torch.ops.mkl._mkl_linear(x[inp], packed[0], packed[1], None, rows)

    peak = measure_gemm_peak()
    flops_per_row = 2 * sum(inp * out for inp, out in shapes) * num_layers
    print(f"cpu: {cpu_model()}; {args.threads} threads; fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s; "
          f"{num_layers} layers x {len(shapes)} GEMMs")  # fmt: skip
    print("| rows | plain MKL ms | oneDNN packed ms | MKL packed ms | MKL packed, of the peak | MKL / oneDNN |")
    print("|---:|---:|---:|---:|---:|---:|")
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = {inp: torch.randn(rows, inp) for inp, _ in shapes}
        best = {}
        for layout in layouts:
            best[layout] = best_seconds(lambda: run(layout, x, rows), 4 if rows < 512 else 2)
        table.append({"rows": rows, **{f"{k}_ms": 1000 * v for k, v in best.items()},
                      "mkl_fraction_of_peak": flops_per_row * rows / best["mkl"] / peak})  # fmt: skip
        print(f"| {rows} | {1000 * best['plain']:.1f} | {1000 * best['onednn']:.1f} | {1000 * best['mkl']:.1f} | "
              f"{flops_per_row * rows / best['mkl'] / peak:.0%} | {best['onednn'] / best['mkl']:.2f}x |", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "packed_gemm.json"
    path.write_text(json.dumps({"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
                                "gemm_peak_gflops": peak / 1e9, "rows": table}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
