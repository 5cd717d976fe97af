"""Host cost of one engine step: everything but the model's forward pass, on a model too small to matter.

    python -m bench.host_overhead [--num-seqs 256] [--steps 60] [--kv-sizes 64M,16G] [--skip-async]

A seeded 1-layer, 64-wide Llama with a 2,048-token vocabulary (built in a temporary directory, the default model's
tokenizer) runs `--num-seqs` sequences decoding with sampling (temperature 0.8, top-p 0.9, a seed each). Per step
it reports the wall time, the time inside the model's forward and logits (negligible here), and their difference:
the host time (scheduling, block manager, input preparation, sampler, output processing, statistics). Offline
(`LLMEngine.step` in a loop) for each KV cache size, and through `AsyncEngine` (its thread, its queues, its stats).
Results go to bench/results/host_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.machine import cpu_flags
from replicas import AsyncEngine, LLMEngine, SamplingParams
from replicas.config import EngineConfig
from replicas.default_model import DEFAULT_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 32
VOCAB_SIZE = 2048


def build_model(
    directory: Path, initializer_range: float = 0.02, num_layers: int = 1, vocab_size: int = VOCAB_SIZE
) -> Path:
    """A seeded random Llama (1 layer by default). At transformers' default init (0.02) its next-token distributions are nearly
    flat (the sampler's worst case: top-p 0.9 spans most of the vocabulary); at 0.3 they are peaked like a trained
    model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                         initializer_range=initializer_range)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(DEFAULT_MODEL_DIR) / name).exists():
            shutil.copy(Path(DEFAULT_MODEL_DIR) / name, directory / name)
    return directory


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def engine_config(model_dir: Path, kv_bytes: int, num_seqs: int) -> EngineConfig:
    return EngineConfig(model=str(model_dir), kv_cache_memory_bytes=kv_bytes, max_num_seqs=num_seqs,
                        max_num_batched_tokens=max(2048, num_seqs * PROMPT_LEN), max_model_len=4096,
                        block_size=16, num_threads=torch.get_num_threads())  # fmt: skip


def make_engine(model_dir: Path, kv_bytes: int, num_seqs: int) -> LLMEngine:
    return LLMEngine(engine_config(model_dir, kv_bytes, num_seqs))


class ForwardTimer:
    """Accumulates the time spent in the model's forward pass and logits (the part that is not host cost)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = 0.0
        model = engine.model_runner.model
        for name in ("forward", "compute_logits"):
            setattr(model, name, self._timed(getattr(model, name)))

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def params(index: int, steps: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=steps * 4 + 64, ignore_eos=True)


def prompts(num_seqs: int) -> list[list[int]]:
    return [[100 + (i * 7 + j * 13) % (VOCAB_SIZE - 100) for j in range(PROMPT_LEN)] for i in range(num_seqs)]


def run_offline(model_dir: Path, kv_bytes: int, num_seqs: int, steps: int, warmup: int) -> dict[str, float]:
    start = time.perf_counter()
    engine = make_engine(model_dir, kv_bytes, num_seqs)
    startup_s = time.perf_counter() - start
    for i, prompt in enumerate(prompts(num_seqs)):
        engine.add_request(f"r{i}", prompt, params(i, steps))
    for _ in range(warmup):  # prefill, then a few decode steps
        engine.step()
    timer = ForwardTimer(engine)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"offline, KV {kv_bytes / 2**20:.0f} MiB", unit="step"):
        outputs = engine.step()
        assert len(outputs) == num_seqs, "every sequence should decode every step"
    wall = (time.perf_counter() - start) / steps
    forward = timer.seconds / steps
    result = {"kv_cache_bytes": kv_bytes, "startup_s": startup_s, "num_blocks": engine.model_runner.num_blocks, "step_ms": 1e3 * wall,
              "forward_ms": 1e3 * forward, "host_ms": 1e3 * (wall - forward)}  # fmt: skip
    del engine
    return result


def run_async(model_dir: Path, kv_bytes: int, num_seqs: int, steps: int, warmup: int) -> dict[str, float]:
    async_engine = AsyncEngine(engine_config(model_dir, kv_bytes, num_seqs))  # built on its thread, as a replica's
    engine = async_engine.engine
    timer = ForwardTimer(engine)
    window: dict[str, float] = {}

    async def consume(i: int, prompt: list[int]) -> None:
        async for _ in async_engine.generate(f"a{i}", prompt, params(i, steps)):
            pass

    async def measure() -> None:
        tasks = [asyncio.create_task(consume(i, p)) for i, p in enumerate(prompts(num_seqs))]
        while engine.num_steps < warmup:
            await asyncio.sleep(0.001)
        steps0, forward0, start = engine.num_steps, timer.seconds, time.perf_counter()
        with tqdm(total=steps, desc="AsyncEngine", unit="step") as progress:
            while engine.num_steps < steps0 + steps:
                await asyncio.sleep(0.005)
                progress.update(engine.num_steps - steps0 - progress.n)
        num_steps = engine.num_steps - steps0
        window.update(wall=(time.perf_counter() - start) / num_steps, forward=(timer.seconds - forward0) / num_steps)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(measure())
    async_engine.shutdown()
    return {"kv_cache_bytes": kv_bytes, "step_ms": 1e3 * window["wall"], "forward_ms": 1e3 * window["forward"],
            "host_ms": 1e3 * (window["wall"] - window["forward"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kv-sizes", default="64M,16G", help="KV cache sizes to compare, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-async", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--label", default="", help="stored with the results (e.g. the commit measured)")
    parser.add_argument("--initializer-range", type=float, default=0.02,
                        help="the model's init scale: 0.02 gives flat distributions (worst case), 0.3 peaked ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.kv_sizes.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"threads, flags {' '.join(cpu_flags())}; {args.num_seqs} sequences decoding with sampling")  # fmt: skip
    results: dict[str, object] = {"label": args.label, "num_seqs": args.num_seqs, "steps": args.steps,
                                  "threads": args.threads, "cpu_flags": cpu_flags(), "offline": [],
                                  "initializer_range": args.initializer_range}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.initializer_range)
        for size in sizes if not args.skip_offline else []:
            results["offline"].append(run_offline(model_dir, size, args.num_seqs, args.steps, args.warmup))
        if not args.skip_async:
            results["async"] = [run_async(model_dir, size, args.num_seqs, args.steps, args.warmup) for size in sizes]
    print()
    print("| mode | KV cache | step ms | forward ms | host ms |")
    print("|---|---|---|---|---|")
    rows = [("offline", r) for r in results["offline"]] + [("AsyncEngine", r) for r in results.get("async", [])]
    for mode, row in rows:
        print(f"| {mode} | {row['kv_cache_bytes'] / 2**20:.0f} MiB | {row['step_ms']:.2f} | {row['forward_ms']:.2f} | "
              f"{row['host_ms']:.2f} |")
    for mode in ("offline", "async"):
        runs = results.get(mode, [])
        if len(runs) > 1:
            spread = max(r["host_ms"] for r in runs) / min(r["host_ms"] for r in runs) - 1
            results[f"{mode}_host_ms_spread_over_kv_sizes"] = spread
            print(f"{mode}: host time spread over KV cache sizes: {spread:.1%}")
    RESULTS_DIR.mkdir(exist_ok=True)
    name = f"host_overhead{'-' + args.label if args.label else ''}.json"
    (RESULTS_DIR / name).write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS_DIR / name}")


if __name__ == "__main__":
    main()
