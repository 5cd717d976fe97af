"""Where a decode-only step's time goes, per attention backend: `python -m bench.offline --profile`.

    python -m bench.offline --profile [--batch 64] [--context 300] [--steps 8] [--backends torch,cpu_fused]
    python -m bench.offline --profile --backends cpu_fused+eager,cpu_fused+compile   # EngineConfig.compile A/B

For each backend: an engine on the model, `batch` requests with `context`-token prompts prefilled, then `steps`
decode-only steps timed with their attention calls (`paged_attention`, `write_kv_cache`, every layer) timed inside
(the attention share of the step, median over steps), and one more step under the torch profiler, printed as a table
by op. The machine's CPU flags go with the figures (bench/results/decode_profile.json).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.machine import cpu_flags, cpu_model
from replicas import LLM, SamplingParams

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class AttentionTimer:
    """Wraps a backend instance's attention ops to sum their wall time (all layers) and label them for the profiler."""

    def __init__(self, backend: object) -> None:
        self.seconds = 0.0
        for op in ("paged_attention", "write_kv_cache"):
            setattr(backend, op, self._timed(op, getattr(backend, op)))

    def _timed(self, label: str, op: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            with torch.profiler.record_function(f"attention::{label}"):
                result = op(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result

        return timed


def profile_backend(
    model: Path, backend: str, batch: int, context: int, steps: int, threads: int | None, dtype: str = "float32"
) -> dict:
    label = backend
    backend, _, mode = backend.partition("+")  # `cpu_fused+eager` / `+compile`: EngineConfig.compile off / on
    backend, _, kv_cache_dtype = backend.partition(":")  # `cpu_fused:bfloat16`: with a 16-bit KV cache
    compile_kwargs = {"compile": mode == "compile"} if mode else {}
    llm = LLM(str(model), attention_backend=backend, num_threads=threads, max_num_seqs=batch, max_model_len=2048,
              max_num_batched_tokens=4096, kv_cache_memory_bytes=2 * 1024**3,
              kv_cache_dtype=kv_cache_dtype or "auto", dtype=dtype, **compile_kwargs)  # fmt: skip
    engine = llm.engine
    assert engine.model_runner.backend.name == backend, engine.model_runner.backend.name
    torch.set_num_threads(engine.config.resolved_num_threads())
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randrange(100, engine.vocab_size) for _ in range(context)]
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()  # the first decode-only step (warm-up)
    timer = AttentionTimer(engine.model_runner.backend)
    step_s, attention_s = [], []
    for _ in range(steps):
        timer.seconds = 0.0
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
        attention_s.append(timer.seconds)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        engine.step()
    table = profiler.key_averages().table(sort_by="cpu_time_total", row_limit=18)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    shares = [a / s for a, s in zip(attention_s, step_s)]
    return {
        "backend": label,
        "dtype": dtype,
        "compile": engine.config.compile,
        "batch": batch,
        "context": context,
        "threads": torch.get_num_threads(),
        "step_ms_median": 1000 * statistics.median(step_s),
        "attention_ms_median": 1000 * statistics.median(attention_s),
        "attention_share_median": statistics.median(shares),
        "attention_share_all": shares,
        "profiler_table": table,
    }


def run(
    model: Path, backends: list[str], batch: int, context: int, steps: int, threads: int | None, dtype: str = "float32"
) -> None:
    flags = cpu_flags()
    print(f"CPU: {cpu_model()}; flags {' '.join(flags)}; decode-only steps, batch {batch}, context ~{context}, {dtype}")
    rows = []
    for backend in backends:
        row = profile_backend(model, backend, batch, context, steps, threads, dtype)
        rows.append(row)
        print(f"\n## {backend}: one decode step under the profiler (attention::* are the backend's ops, all layers)")
        print(row["profiler_table"])
    print("\n| backend | step ms (median) | attention ms (all layers) | attention share (median) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['step_ms_median']:.0f} | {row['attention_ms_median']:.1f} | "
              f"{row['attention_share_median']:.1%} |")  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "decode_profile.json"
    path.write_text(json.dumps({"cpu": cpu_model(), "cpu_flags": flags, "runs": rows}, indent=2))
    print(f"\nwrote {path}")
