"""How close to this machine's roofline the engine runs bench.offline's mixed workload, step by step.

    python -m bench.roofline [--model DIR] [--dtype float32|bfloat16] [--kv-cache-dtype bfloat16|float16]

Measures, in the same run, the GEMM peak (as bench.offline does) and the DRAM read bandwidth (a 1-GiB sum), then runs
the workload once, timing each step's forward pass and noting its shape (rows, each sequence's context). Each step's
floor is what no implementation can beat on this machine: every Linear layer takes at least its FLOPs at the peak
or its weights at the bandwidth, whichever is longer (the LM head only on the rows that sample), and attention at
least its FLOPs at the peak or the KV cache it reads at the bandwidth; the layers run one after another. The
workload's ceiling is bench.offline's credited FLOPs (2 x parameters per token plus attention) over the peak times
the summed floors: the fraction of the GEMM peak a perfect engine with this schedule would print. Also, for a
decode-only step at batch 64 and context ~300 (bench.offline --profile's), the attention share if attention ran at
the bandwidth floor and the GEMMs as fast as they run here. Writes bench/results/roofline-<dtype>[-kv-<kv dtype>].json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.machine import cpu_flags, machine_description
from bench.offline import make_workload, measure_gemm_peak, peak_fraction, run_engine, workload_flops, workload_llm
from bench.timing import best_seconds
from replicas.default_model import DEFAULT_MODEL_DIR
from replicas.engine import LLMEngine
from replicas.models.packed_linear import PackedLinear

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Step classes of the report: prefill-heavy steps, then decode-only steps by rows.
STEP_CLASSES = ("prefill", "decode 32+", "decode 8-31", "decode 1-7")


def measure_read_bandwidth(num_bytes: int = 1024**3, repeats: int = 5) -> float:
    """Best observed bytes/s of summing a `num_bytes` fp32 tensor with the current torch thread count."""
    data = torch.ones(num_bytes // 4)
    return num_bytes / best_seconds(data.sum, repeats)


@dataclass
class StepShape:
    """What one step computed: each scheduled sequence's new tokens and context (keys it attends to at the end)."""

    new_tokens: list[int]
    contexts: list[int]
    num_sampling: int
    seconds: float = 0.0

    @property
    def step_class(self) -> str:
        if sum(self.new_tokens) > len(self.new_tokens):
            return "prefill"
        rows = len(self.new_tokens)
        return "decode 32+" if rows >= 32 else "decode 8-31" if rows >= 8 else "decode 1-7"


@dataclass
class Machine:
    peak_flops: float
    bandwidth: float  # bytes/s


@dataclass
class ModelCost:
    """What the floors need from the model: its Linear shapes, element sizes, attention sizes."""

    decoder_linears: list[tuple[int, int]]  # (in, out) of every Linear but the LM head
    lm_head: tuple[int, int]
    weight_bytes: int  # per element
    kv_bytes_per_token: int  # all layers, K and V
    attention_flops_per_key: int  # per query token and key, all layers and heads (QK and PV)

    @classmethod
    def of(cls, engine: LLMEngine) -> ModelCost:
        runner = engine.model_runner
        model, config = runner.model, runner.hf_config
        lm_head = getattr(model, "lm_head", None)
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear)) and m is not lm_head]
        vocab, hidden = model.embed_tokens.weight.shape
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            decoder_linears=[(m.in_features, m.out_features) for m in linears],
            lm_head=(hidden, vocab),
            weight_bytes=torch.empty((), dtype=runner.dtype).element_size(),
            kv_bytes_per_token=runner.kv_spec.bytes_per_token,
            attention_flops_per_key=4 * config.num_attention_heads * head_dim * config.num_hidden_layers,
        )

    def gemm_floor_s(self, rows: int, shapes: list[tuple[int, int]], machine: Machine) -> float:
        return sum(max(2 * rows * i * o / machine.peak_flops, i * o * self.weight_bytes / machine.bandwidth)
                   for i, o in shapes)  # fmt: skip

    def attention_floor_s(self, step: StepShape, machine: Machine) -> float:
        # Each sequence's KV read once (a prefill chunk's later query tiles find it in cache at best).
        kv_bytes = sum(self.kv_bytes_per_token * context for context in step.contexts)
        flops = sum(self.attention_flops_per_key * new * (context - new / 2)
                    for new, context in zip(step.new_tokens, step.contexts))  # fmt: skip
        return max(flops / machine.peak_flops, kv_bytes / machine.bandwidth)

    def step_floor_s(self, step: StepShape, machine: Machine) -> float:
        return (self.gemm_floor_s(sum(step.new_tokens), self.decoder_linears, machine)
                + self.gemm_floor_s(step.num_sampling, [self.lm_head], machine)
                + self.attention_floor_s(step, machine))  # fmt: skip


@contextmanager
def recorded_steps(engine: LLMEngine) -> Iterator[list[StepShape]]:
    """Each forward pass's shape and wall time while the block runs."""
    execute = engine.model_runner.execute
    steps: list[StepShape] = []

    def recording_execute(scheduled):
        items = scheduled.scheduled
        step = StepShape([item.num_new_tokens for item in items],
                         [item.seq.num_computed_tokens + item.num_new_tokens for item in items],
                         sum(item.produces_token for item in items))  # fmt: skip
        start = time.perf_counter()
        try:
            return execute(scheduled)
        finally:
            step.seconds = time.perf_counter() - start
            steps.append(step)

    engine.model_runner.execute = recording_execute
    try:
        yield steps
    finally:
        engine.model_runner.execute = execute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    args = parser.parse_args()
    print(machine_description(), flush=True)
    llm = workload_llm(args, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    torch.set_num_threads(engine.config.resolved_num_threads())
    dtype = getattr(torch, args.dtype)
    machine = Machine(measure_gemm_peak(dtype=dtype), measure_read_bandwidth())
    print(f"{args.dtype} GEMM peak {machine.peak_flops / 1e9:.0f} GFLOP/s, DRAM read "
          f"{machine.bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)", flush=True)  # fmt: skip
    cost = ModelCost.of(engine)
    workload = make_workload(args.num_requests, args.seed, engine.vocab_size)
    flops = workload_flops(engine.model_runner.model, engine.model_runner.hf_config, workload)
    with recorded_steps(engine) as steps:
        tokens, elapsed, _ = run_engine(llm, workload)
    floors = [cost.step_floor_s(step, machine) for step in steps]
    total_s = sum(s.seconds for s in steps)
    measured_fraction = peak_fraction(flops, tokens / elapsed, workload, machine.peak_flops)
    ceiling = flops / machine.peak_flops / sum(floors)
    print(f"\n{len(workload)} requests, {tokens} output tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} tok/s): "
          f"{measured_fraction:.0%} of the peak; forward passes {total_s:.1f} s, their floors "
          f"{sum(floors):.1f} s: **the roofline ceiling of this workload and schedule is {ceiling:.0%} of the peak**")
    print("\n| steps | count | measured s | floor s | floor / measured | share of measured time |")
    print("|---|---:|---:|---:|---:|---:|")
    by_class = []
    for step_class in STEP_CLASSES:
        chosen = [(s, f) for s, f in zip(steps, floors) if s.step_class == step_class]
        measured_s, floor_s = sum(s.seconds for s, _ in chosen), sum(f for _, f in chosen)
        by_class.append({"steps": step_class, "count": len(chosen), "measured_s": measured_s, "floor_s": floor_s})
        if chosen:
            print(f"| {step_class} | {len(chosen)} | {measured_s:.2f} | {floor_s:.2f} | {floor_s / measured_s:.0%} | "
                  f"{measured_s / total_s:.0%} |")  # fmt: skip
    # bench.offline --profile's decode-only step: batch 64, context ~300.
    decode = StepShape([1] * 64, [300] * 64, 64)
    gemm_s = cost.gemm_floor_s(64, cost.decoder_linears, machine) + cost.gemm_floor_s(64, [cost.lm_head], machine)
    attention_s = cost.attention_floor_s(decode, machine)
    measured_gemm_s = time_gemms(cost, 64, dtype)
    share_at_floor = attention_s / (attention_s + measured_gemm_s)
    print(f"\nDecode-only step, batch 64, context 300: attention floor {1000 * attention_s:.1f} ms (its KV cache at "
          f"the bandwidth), GEMM floor {1000 * gemm_s:.1f} ms, GEMMs measured here {1000 * measured_gemm_s:.1f} ms: "
          f"with attention at its floor it would still be {share_at_floor:.0%} of the step "
          f"({attention_s / (attention_s + gemm_s):.0%} with GEMMs at theirs)")  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    kv_suffix = "" if args.kv_cache_dtype == "auto" else f"-kv-{args.kv_cache_dtype}"
    path = RESULTS_DIR / f"roofline-{args.dtype}{kv_suffix}.json"
    path.write_text(json.dumps({
        "machine": machine_description(), "cpu_flags": cpu_flags(), "dtype": args.dtype,
        "kv_cache_dtype": str(engine.model_runner.kv_dtype), "gemm_peak_gflops": machine.peak_flops / 1e9,
        "read_bandwidth_gbs": machine.bandwidth / 1e9, "tok_s": tokens / elapsed,
        "fraction_of_gemm_peak": measured_fraction, "roofline_ceiling": ceiling, "by_step_class": by_class,
        "decode64_attention_floor_ms": 1000 * attention_s, "decode64_gemm_floor_ms": 1000 * gemm_s,
        "decode64_gemm_measured_ms": 1000 * measured_gemm_s, "decode64_attention_share_at_floor": share_at_floor,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")


def time_gemms(cost: ModelCost, rows: int, dtype: torch.dtype, repeats: int = 4) -> float:
    """Best time of the model's GEMMs at `rows` rows through `PackedLinear` (the engine's layers), random weights
    of its shapes, streamed from memory as in a step."""
    shapes = [*cost.decoder_linears, cost.lm_head]
    layers = [PackedLinear(torch.randn(o, i, dtype=dtype) * 0.02, None) for i, o in shapes]
    inputs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in shapes}

    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    with torch.inference_mode():
        return best_seconds(run, repeats)


if __name__ == "__main__":
    main()
