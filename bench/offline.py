"""Offline throughput: HF `generate` one request at a time, HF static batches, and this engine, in one process.

    python -m bench.offline [--model DIR] [--quick]
    python -m bench.offline --tiny     # a seeded 4-layer, 64-wide Llama, 24 requests: the engine's own overhead
    python -m bench.offline --profile  # a decode-only step by op, per attention backend (bench/decode_profile.py)
    python -m bench.offline --compile-ab          # also the mixed workload with EngineConfig.compile flipped
    python -m bench.offline --gemm-ab             # fp32 weights packed by MKL (default) against oneDNN
    python -m bench.offline --dtype bfloat16      # bf16 weights, % of a bf16 GEMM peak

Prints tok/s and ratios, the engine's pure-decode FLOP/s as a fraction of this machine's measured fp32 GEMM peak,
and the share of step time spent outside the model (scheduler, block manager, sampler, output processing).
Results also go to bench/results/offline.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from unittest import mock
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench.machine import cpu_flags, cpu_model
from bench.timing import best_seconds
from replicas import LLM, LLMEngine, SamplingParams
from replicas.model_runner import cpu_has_bf16_compute
from replicas.default_model import DEFAULT_MODEL_DIR
from replicas.models.layers import bind_cpu_ops
from replicas.models.packed_linear import PackedLinear

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(num_requests: int, seed: int, vocab_size: int) -> list[Request]:
    """Prompts of 32-256 tokens, outputs of 16-128 tokens (greedy, EOS ignored), seeded."""
    rng = random.Random(seed)
    return [
        Request([rng.randrange(100, vocab_size) for _ in range(rng.randint(32, 256))], rng.randint(16, 128))
        for _ in range(num_requests)
    ]


def measure_gemm_peak(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best observed GEMM FLOP/s of `dtype` on this machine with the current torch thread count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats)


def flops_per_token(model: torch.nn.Module, hf_config: object, context_len: float) -> float:
    """Matmul FLOPs of one token: 2 x weights in linear layers (lm_head included) + attention over the context."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear)))
    if getattr(model, "lm_head", None) is None:
        linear += model.embed_tokens.weight.numel()
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    attention = 4 * context_len * hf_config.num_attention_heads * head_dim * hf_config.num_hidden_layers
    return 2 * linear + attention


def peak_fraction(flops: float, tok_s: float, workload: list[Request], peak: float) -> float:
    """The fraction of `peak` a run of `workload` (`flops` in all) at `tok_s` output tokens per second reaches."""
    return flops * tok_s / sum(r.max_tokens for r in workload) / peak


def workload_flops(model: torch.nn.Module, hf_config: object, workload: list[Request]) -> float:
    """Matmul FLOPs of computing every prompt and output token of the workload once (prompt tokens attend to half
    their prompt on average, output tokens to the prompt plus half the output)."""
    total = 0.0
    for request in workload:
        prompt, output = len(request.prompt_token_ids), request.max_tokens
        total += prompt * flops_per_token(model, hf_config, prompt / 2)
        total += output * flops_per_token(model, hf_config, prompt + output / 2)
    return total


def run_hf_sequential(model_dir: Path, workload: list[Request], dtype: torch.dtype = torch.float32) -> tuple[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for request in tqdm(workload, desc="HF generate, one at a time", unit="req"):
            ids = torch.tensor([request.prompt_token_ids])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2,
                max_new_tokens=request.max_tokens, min_new_tokens=request.max_tokens,
            )
            tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


def run_hf_static_batches(
    model_dir: Path, workload: list[Request], batch_size: int, dtype: torch.dtype = torch.float32
) -> tuple[int, float]:
    """The seed's static batching: pad a batch, generate until its longest request is done; count useful tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokens = 0
    start = time.perf_counter()
    batches = [workload[i : i + batch_size] for i in range(0, len(workload), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc=f"HF static batches of {batch_size}", unit="batch"):
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), 2, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for row, request in enumerate(batch):
                ids[row, width - len(request.prompt_token_ids) :] = torch.tensor(request.prompt_token_ids)
                mask[row, width - len(request.prompt_token_ids) :] = 1
            longest = max(r.max_tokens for r in batch)
            model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=2,
                           max_new_tokens=longest, min_new_tokens=longest)
            tokens += sum(r.max_tokens for r in batch)
    return tokens, time.perf_counter() - start


@contextmanager
def timed_model(engine: LLMEngine) -> Iterator[list[float]]:
    """Accumulate the time spent in the model runner (the forward pass) while the block runs."""
    execute = engine.model_runner.execute
    model_time = [0.0]

    def timed_execute(scheduled):
        start = time.perf_counter()
        try:
            return execute(scheduled)
        finally:
            model_time[0] += time.perf_counter() - start

    engine.model_runner.execute = timed_execute
    try:
        yield model_time
    finally:
        engine.model_runner.execute = execute


def run_engine(llm: LLM, workload: list[Request],
               token_ids: list[list[int]] | None = None) -> tuple[int, float, dict[str, float]]:  # fmt: skip
    """Generate the whole workload; also time the step outside the model runner (the engine's own overhead).
    `token_ids`, if given, receives each request's output tokens."""
    prompts = [r.prompt_token_ids for r in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in workload]
    with timed_model(llm.engine) as model_time:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    if token_ids is not None:
        token_ids.extend(o.outputs[0].token_ids for o in outputs)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens, elapsed, {"model_s": model_time[0], "engine_overhead_s": elapsed - model_time[0]}


def workload_llm(args: argparse.Namespace, **overrides: object) -> LLM:
    """An engine for the mixed workload, warmed up on other prompts of the same shape. NOTE: prefix caching is off:
    an engine runs the workload more than once (A/B), and a later run would find its prompts cached and skip their
    prefill; the workload's random prompts share nothing, so a single run loses nothing by it."""
    options = {"dtype": args.dtype, **overrides}
    llm = LLM(str(args.model), num_threads=args.threads, max_num_seqs=128, max_model_len=2048,
              kv_cache_memory_bytes=3 * 1024**3, enable_prefix_caching=False, **options)  # fmt: skip
    run_engine(llm, make_workload(16, args.seed + 1, llm.engine.vocab_size))
    return llm


def run_variant(args: argparse.Namespace, workload: list[Request], reference: list[list[int]], flops: float,
                peak: float, **overrides: object) -> dict[str, float]:  # fmt: skip
    """The mixed workload on a fresh engine with `overrides`: tok/s, fraction of the GEMM peak, greedy agreement."""
    llm = workload_llm(args, **overrides)
    outputs: list[list[int]] = []
    tokens, elapsed, _ = run_engine(llm, workload, outputs)
    return {"tok_s": tokens / elapsed, "fraction_of_gemm_peak": flops / elapsed / peak,
            **greedy_agreement(reference, outputs)}  # fmt: skip


def greedy_agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict[str, float]:
    """How far greedy outputs follow the reference: tokens before the first difference, and identical outputs."""
    common = [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
              for ref, out in zip(reference, outputs)]  # fmt: skip
    return {"tokens_before_divergence": sum(common) / sum(len(ref) for ref in reference),
            "identical_outputs": sum(ref == out for ref, out in zip(reference, outputs)) / len(reference)}


def measure_decode(llm: LLM, batch_size: int, prompt_len: int, num_steps: int, peak: float) -> dict[str, float]:
    """Steady-state pure decode at `batch_size`: tok/s, achieved matmul FLOP/s and its fraction of the GEMM peak,
    and the share of each step spent outside the model (scheduler, block manager, sampler, detokenizer)."""
    engine = llm.engine
    rng = random.Random(batch_size)
    for i in range(batch_size):
        engine.add_request(
            f"decode-{batch_size}-{i}",
            [rng.randrange(100, engine.vocab_size) for _ in range(prompt_len)],
            SamplingParams(temperature=0.0, max_tokens=num_steps + 10, ignore_eos=True),
        )
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()
    with timed_model(engine) as model_time:
        start = time.perf_counter()
        for _ in tqdm(range(num_steps), desc=f"pure decode at batch {batch_size}", unit="step"):
            engine.step()
        elapsed = time.perf_counter() - start
    for request_id in list(engine.requests):
        engine.abort(request_id)
    context = prompt_len + 1 + num_steps / 2
    flops = flops_per_token(engine.model_runner.model, engine.model_runner.hf_config, context)
    tok_s = batch_size * num_steps / elapsed
    return {
        "batch_size": batch_size,
        "step_ms": 1000 * elapsed / num_steps,
        "tok_s": tok_s,
        "achieved_gflops": tok_s * flops / 1e9,
        "fraction_of_gemm_peak": tok_s * flops / peak,
        "overhead_fraction": (elapsed - model_time[0]) / elapsed,
    }


def fused_ab(llm: LLM, workload: list[Request], reference: list[list[int]], flops: float,
             peak: float) -> dict[str, object]:  # fmt: skip
    """The mixed workload on the same engine with the fused elementwise ops unbound (eager ATen norms, RoPE and
    SiLU·mul) and bound again, alternately (2 runs each): tok/s of each, their ratio, greedy agreement of eager."""
    runner = llm.engine.model_runner
    ops = getattr(runner.backend, "ops", None)
    if ops is None or runner.compiled:
        print("fused A/B: needs the cpu_fused backend, eager (nothing to compare)")
        return {}
    tok_s: dict[bool, list[float]] = {True: [], False: []}
    eager_outputs: list[list[int]] = []
    try:
        for _ in range(2):
            for fused in (False, True):
                bind_cpu_ops(runner.model, ops if fused else None)
                tokens, elapsed, _ = run_engine(llm, workload, None if fused else eager_outputs)
                tok_s[fused].append(tokens / elapsed)
    finally:
        bind_cpu_ops(runner.model, ops)
    agreement = greedy_agreement(reference, eager_outputs[: len(workload)])
    fused_tok_s, eager_tok_s = max(tok_s[True]), max(tok_s[False])
    print(f"fused elementwise A/B on the mixed workload (best of 2, interleaved): fused {fused_tok_s:.1f} tok/s = "
          f"{peak_fraction(flops, fused_tok_s, workload, peak):.0%} of the GEMM peak, eager ATen ops {eager_tok_s:.1f} tok/s = "
          f"{peak_fraction(flops, eager_tok_s, workload, peak):.0%}; fused / eager {fused_tok_s / eager_tok_s:.3f}; greedy "
          f"outputs identical {agreement['identical_outputs']:.1%}")  # fmt: skip
    return {"fused_tok_s": tok_s[True], "eager_tok_s": tok_s[False], "ratio": fused_tok_s / eager_tok_s,
            **agreement}  # fmt: skip


def interleaved_ab(llm: LLM, other_llm: LLM, workload: list[Request],
                   reference: list[list[int]]) -> tuple[list[float], list[float], dict[str, float]]:  # fmt: skip
    """The workload on two engines alternately (2 runs each, the other first), so a loaded machine's drift hits both
    alike: tok/s of each run of `llm`, of `other_llm`, and the greedy agreement of `other_llm` with `reference`."""
    tok_s: tuple[list[float], list[float]] = ([], [])
    other_outputs: list[list[int]] = []
    for _ in range(2):
        for index, engine_llm in ((1, other_llm), (0, llm)):
            tokens, elapsed, _ = run_engine(engine_llm, workload, other_outputs if index else None)
            tok_s[index].append(tokens / elapsed)
    return tok_s[0], tok_s[1], greedy_agreement(reference, other_outputs[: len(workload)])


def gemm_ab(args: argparse.Namespace, llm: LLM, workload: list[Request], reference: list[list[int]],
            flops: float, peak: float) -> dict[str, object]:  # fmt: skip
    """float32 packed weights: MKL's packed sgemm (the default, `llm`) against oneDNN's packing (the default before)
    on a second engine, run alternately: tok/s of each, their ratio, greedy agreement of oneDNN's outputs."""
    if args.dtype != "float32" or not llm.engine.config.prepack_weights or llm.engine.config.compile:
        print("GEMM A/B: needs float32 prepacked weights, eager (nothing to compare)")
        return {}
    with mock.patch.object(torch.backends.mkl, "is_available", lambda: False):  # PackedLinear picks at load
        onednn_llm = workload_llm(args)
    mkl_tok_s, onednn_tok_s, agreement = interleaved_ab(llm, onednn_llm, workload, reference)
    del onednn_llm
    best_mkl, best_onednn = max(mkl_tok_s), max(onednn_tok_s)
    print(f"packed GEMM A/B on the mixed workload (best of 2, interleaved): MKL {best_mkl:.1f} tok/s = "
          f"{peak_fraction(flops, best_mkl, workload, peak):.0%} of the GEMM peak, oneDNN {best_onednn:.1f} tok/s = "
          f"{peak_fraction(flops, best_onednn, workload, peak):.0%}; MKL / oneDNN {best_mkl / best_onednn:.3f}; greedy "
          f"outputs identical {agreement['identical_outputs']:.1%}")  # fmt: skip
    return {"mkl_tok_s": mkl_tok_s, "onednn_tok_s": onednn_tok_s, "ratio": best_mkl / best_onednn, **agreement}


def compile_ab(args: argparse.Namespace, llm: LLM, workload: list[Request], reference: list[list[int]],
               flops: float, peak: float) -> dict[str, object]:  # fmt: skip
    """The mixed workload with `compile` flipped, run alternately with the first engine (2 runs each), so a loaded
    machine's drift hits both alike: tok/s of each, their ratio, and greedy agreement with the first run."""
    other = not llm.engine.config.compile
    start = time.perf_counter()
    other_llm = workload_llm(args, compile=other)
    print(f"engine with compile={other} ready in {time.perf_counter() - start:.1f} s")
    first_tok_s, other_tok_s, agreement = interleaved_ab(llm, other_llm, workload, reference)
    tok_s = {other: other_tok_s, not other: first_tok_s}
    compiled_tok_s, eager_tok_s = max(tok_s[True]), max(tok_s[False])
    print(f"compile A/B on the mixed workload (best of 2, interleaved): compiled {compiled_tok_s:.1f} tok/s = "
          f"{peak_fraction(flops, compiled_tok_s, workload, peak):.0%} of the GEMM peak, eager "
          f"{eager_tok_s:.1f} tok/s; compiled / eager {compiled_tok_s / eager_tok_s:.3f}; greedy outputs identical "
          f"{agreement['identical_outputs']:.1%}")  # fmt: skip
    del other_llm
    return {"compiled_tok_s": tok_s[True], "eager_tok_s": tok_s[False], "ratio": compiled_tok_s / eager_tok_s,
            **agreement}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--naive-subset", type=int, default=8, help="requests run through HF one at a time")
    parser.add_argument("--static-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs given)")
    parser.add_argument("--quick", action="store_true", help="16 requests, 4 sequential, short decode runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a seeded 4-layer, 64-wide Llama with a 49,152-token vocabulary (built in a temporary directory), 24 requests, all of "
                             "them also through HF one at a time: with a negligible model, what the engine itself costs")
    parser.add_argument("--profile", action="store_true",
                        help="profile decode-only steps per attention backend (see bench/decode_profile.py)")
    parser.add_argument("--batch", type=int, default=64, help="--profile: decoding sequences")
    parser.add_argument("--context", type=int, default=300, help="--profile: prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="--profile: timed decode steps per backend")
    parser.add_argument("--backends", default="torch,cpu_fused", help="--profile: comma-separated backends")
    parser.add_argument("--prepack-ab", action="store_true",
                        help="also run the mixed workload with prepack_weights flipped (plain MKL weights, by default) "
                             "and print the packed / plain ratio")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and compute of the engine and HF (pinned, not `auto`: the figures compare with "
                             "HF); bfloat16 prints %% of a bf16 GEMM peak")
    parser.add_argument("--fused-ab", action="store_true",
                        help="also run the mixed workload with the fused elementwise ops off and on, interleaved")
    parser.add_argument("--gemm-ab", action="store_true",
                        help="also the mixed workload on fp32 weights packed by oneDNN (the default before MKL's)")
    parser.add_argument("--compile-ab", action="store_true",
                        help="also run the mixed workload with EngineConfig.compile flipped, interleaved twice: the "
                             "tok/s ratio and greedy agreement")
    parser.add_argument("--engine-only", action="store_true",
                        help="stop after the engine runs (no HF baselines, no pure-decode table, no offline.json)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["bfloat16", "float16"],
                        help="also run the workload with this 16-bit KV cache: throughput and greedy agreement")
    args = parser.parse_args()
    if args.profile:
        from bench import decode_profile

        decode_profile.run(
            args.model, args.backends.split(","), args.batch, args.context, args.steps, args.threads, args.dtype
        )
        return
    if args.tiny:
        run_tiny(args)
        return
    if args.quick:
        args.num_requests, args.naive_subset = 16, 4

    # max_num_seqs 128 for the pure-decode measurement; the mixed workload has 64 requests.
    dtype = getattr(torch, args.dtype)
    llm = workload_llm(args)
    torch.set_num_threads(llm.engine.config.resolved_num_threads())
    threads = torch.get_num_threads()
    workload = make_workload(args.num_requests, args.seed, llm.engine.vocab_size)
    print(f"machine: {threads} torch threads, CPU only (no GPU); model {args.model.name}; "
          f"{len(workload)} requests, prompts 32-256, outputs 16-128 tokens, greedy")
    print(f"cpu: {cpu_model()}; flags {' '.join(cpu_flags())}; compile {llm.engine.config.compile}")
    if dtype == torch.bfloat16 and not cpu_has_bf16_compute():
        print("no avx512_bf16 here: bf16 GEMMs are emulated through fp32 (slow); the figures show what that costs")
    peak = measure_gemm_peak(dtype=dtype)
    print(f"measured {args.dtype} GEMM peak: {peak / 1e9:.1f} GFLOP/s")

    results: dict[str, object] = {"threads": threads, "gemm_peak_gflops": peak / 1e9, "num_requests": len(workload),
                                  "attention_backend": llm.engine.model_runner.backend.name, "dtype": args.dtype,
                                  "compile": llm.engine.config.compile, "cpu_flags": cpu_flags()}  # fmt: skip
    reference: list[list[int]] = []
    tokens, elapsed, split = run_engine(llm, workload, reference)
    engine_tok_s = tokens / elapsed
    flops = workload_flops(llm.engine.model_runner.model, llm.engine.model_runner.hf_config, workload)
    results["engine"] = {"tokens": tokens, "seconds": elapsed, "tok_s": engine_tok_s, **split,
                         "gflops": flops / elapsed / 1e9, "fraction_of_gemm_peak": flops / elapsed / peak}  # fmt: skip
    print(f"engine on the mixed workload: {engine_tok_s:.1f} tok/s, {flops / elapsed / 1e9:.1f} GFLOP/s = "
          f"{flops / elapsed / peak:.0%} of the measured {args.dtype} GEMM peak ({peak / 1e9:.1f} GFLOP/s; 2 x parameters "
          f"per computed prompt and output token + attention)")  # fmt: skip
    if dtype == torch.bfloat16:
        # The fp32 engine beside it, against the fp32 peak, and how far bf16's greedy outputs follow fp32's.
        fp32_peak = measure_gemm_peak(dtype=torch.float32)
        fp32 = run_variant(args, workload, reference, flops, fp32_peak, dtype="float32")
        results["engine_fp32"] = {"gemm_peak_gflops": fp32_peak / 1e9, **fp32}
        print(f"fp32 engine: {fp32['tok_s']:.1f} tok/s = {fp32['fraction_of_gemm_peak']:.0%} of the measured fp32 "
              f"GEMM peak ({fp32_peak / 1e9:.1f} GFLOP/s); bf16 / fp32 {engine_tok_s / fp32['tok_s']:.2f}x; greedy "
              f"agreement of bf16 with fp32: {fp32['tokens_before_divergence']:.1%} of tokens before the first "
              f"difference, {fp32['identical_outputs']:.1%} of outputs identical")  # fmt: skip
    if args.prepack_ab:
        packed_first = llm.engine.config.prepack_weights  # the default: the engine above ran prepacked
        flipped = run_variant(args, workload, reference, flops, peak, prepack_weights=not packed_first)
        results["engine_plain_weights" if packed_first else "engine_prepacked_weights"] = flipped
        ratio = engine_tok_s / flipped["tok_s"] if packed_first else flipped["tok_s"] / engine_tok_s
        print(f"{'plain' if packed_first else 'prepacked (oneDNN)'} weights: {flipped['tok_s']:.1f} tok/s = "
              f"{flipped['fraction_of_gemm_peak']:.0%} of the GEMM peak; packed / plain {ratio:.2f}x; "
              f"{flipped['identical_outputs']:.1%} of outputs identical")  # fmt: skip
    if args.fused_ab:
        results["fused_ab"] = fused_ab(llm, workload, reference, flops, peak)
    if args.gemm_ab:
        results["gemm_ab"] = gemm_ab(args, llm, workload, reference, flops, peak)
    if args.compile_ab:
        results["compile_ab"] = compile_ab(args, llm, workload, reference, flops, peak)
    if args.kv_cache_dtype:
        kv16 = run_variant(args, workload, reference, flops, peak, kv_cache_dtype=args.kv_cache_dtype)
        results["engine_kv16"] = {"kv_cache_dtype": args.kv_cache_dtype, **kv16}
        print(f"{args.kv_cache_dtype} KV cache: {kv16['tok_s']:.1f} tok/s = {kv16['fraction_of_gemm_peak']:.0%} of "
              f"the GEMM peak (fp32 KV {engine_tok_s:.1f}); greedy agreement with fp32 KV: "
              f"{kv16['tokens_before_divergence']:.1%} of tokens before the first difference, "
              f"{kv16['identical_outputs']:.1%} of outputs identical")  # fmt: skip

    if args.engine_only:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "offline_engine.json").write_text(json.dumps(results, indent=2))
        print(f"\nwrote {RESULTS_DIR / 'offline_engine.json'}")
        return
    static_tokens, static_s = run_hf_static_batches(args.model, workload, args.static_batch_size, dtype)
    static_tok_s = static_tokens / static_s
    results["hf_static"] = {"tokens": static_tokens, "seconds": static_s, "tok_s": static_tok_s}

    naive_tokens, naive_s = run_hf_sequential(args.model, workload[: args.naive_subset], dtype)
    naive_tok_s = naive_tokens / naive_s
    results["hf_sequential"] = {"tokens": naive_tokens, "seconds": naive_s, "tok_s": naive_tok_s,
                                "subset": args.naive_subset}

    decode_steps = 10 if args.quick else 30
    results["decode"] = [measure_decode(llm, b, 128, decode_steps, peak) for b in (32, 64, 128)]

    print()
    print(f"| system | tok/s | vs HF sequential | vs HF static-{args.static_batch_size} |")
    print("|---|---|---|---|")
    print(f"| HF generate, one at a time ({args.naive_subset} req) | {naive_tok_s:.1f} | 1.0x | "
          f"{naive_tok_s / static_tok_s:.2f}x |")
    print(f"| HF static batches of {args.static_batch_size} | {static_tok_s:.1f} | {static_tok_s / naive_tok_s:.1f}x | 1.0x |")
    print(f"| this engine (continuous batching, paged KV) | {engine_tok_s:.1f} | {engine_tok_s / naive_tok_s:.1f}x | "
          f"{engine_tok_s / static_tok_s:.1f}x |")
    print(f"engine overhead outside the model over the workload: {split['engine_overhead_s'] / elapsed:.1%}")
    print()
    print("| decode batch | step ms | tok/s | GFLOP/s | of GEMM peak | step time outside the model |")
    print("|---|---|---|---|---|---|")
    for row in results["decode"]:
        print(f"| {row['batch_size']} | {row['step_ms']:.0f} | {row['tok_s']:.0f} | {row['achieved_gflops']:.1f} | "
              f"{row['fraction_of_gemm_peak']:.0%} | {row['overhead_fraction']:.1%} |")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "offline.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS_DIR / 'offline.json'}")


def run_tiny(args: argparse.Namespace) -> None:
    import tempfile

    from bench.host_overhead import build_model

    with tempfile.TemporaryDirectory() as tmp:
        # The tests' tiny models' shape: the default tokenizer's full vocabulary, peaked distributions.
        model_dir = build_model(Path(tmp), initializer_range=0.3, num_layers=4, vocab_size=49152)
        llm = LLM(str(model_dir), num_threads=args.threads, max_num_seqs=64, max_model_len=2048,
                  kv_cache_memory_bytes=256 * 1024**2)  # fmt: skip
        torch.set_num_threads(llm.engine.config.resolved_num_threads())
        workload = make_workload(24, args.seed, llm.engine.vocab_size)
        print(f"machine: {torch.get_num_threads()} torch threads, CPU only; tiny 4-layer Llama; 24 requests, "
              f"prompts 32-256, outputs 16-128 tokens, greedy")  # fmt: skip
        run_engine(llm, workload[:4])  # warm-up
        tokens, elapsed, split = run_engine(llm, workload)
        naive_tokens, naive_s = run_hf_sequential(model_dir, workload)
    engine_tok_s, naive_tok_s = tokens / elapsed, naive_tokens / naive_s
    print(f"\n| system | tok/s | vs HF one at a time |\n|---|---|---|\n"
          f"| HF generate, one at a time | {naive_tok_s:.0f} | 1.0x |\n"
          f"| this engine | {engine_tok_s:.0f} | {engine_tok_s / naive_tok_s:.1f}x |")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "offline_tiny.json").write_text(json.dumps({
        "engine": {"tokens": tokens, "seconds": elapsed, "tok_s": engine_tok_s, **split},
        "hf_sequential": {"tokens": naive_tokens, "seconds": naive_s, "tok_s": naive_tok_s},
        "ratio": engine_tok_s / naive_tok_s, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
