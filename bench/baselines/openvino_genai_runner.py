"""Runs a workload through OpenVINO GenAI's continuous-batching pipeline; executed by the OpenVINO venv's Python
(bench/openvino.py sets it up and calls this), so it imports nothing from this project.

    python bench/baselines/openvino_genai_runner.py --model-ir DIR --precision f32 --threads 2 \
        --workload workload.json --out outputs.json

The workload file holds `{"warmup": [[prompt ids, max_tokens], ...], "requests": [...]}`; every request is greedy
with EOS ignored, so each generates exactly max_tokens. `--precision f32` asks for fp32 compute and an fp32 KV
cache and turns dynamic quantization off (what this project's fp32 engine does); `default` keeps the library's CPU
defaults (bf16 compute and a compressed KV cache where the CPU has them). Writes the timing and the outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import openvino as ov
import openvino_genai as ov_genai


def generation_configs(requests: list[list]) -> list[ov_genai.GenerationConfig]:
    configs = []
    for _, max_tokens in requests:
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = max_tokens
        config.do_sample, config.ignore_eos = False, True
        configs.append(config)
    return configs


def run(pipe: ov_genai.ContinuousBatchingPipeline, requests: list[list]) -> tuple[list[list[int]], float]:
    prompts = [ov.Tensor(np.array([prompt], dtype=np.int64)) for prompt, _ in requests]
    configs = generation_configs(requests)
    start = time.perf_counter()
    results = pipe.generate(prompts, configs)
    elapsed = time.perf_counter() - start
    return [list(result.m_generation_ids[0]) for result in results], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-ir", required=True)
    parser.add_argument("--precision", choices=["f32", "default"], default="f32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    workload = json.load(open(args.workload))

    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_batched_tokens = args.max_num_batched_tokens
    scheduler.max_num_seqs = args.max_num_seqs
    scheduler.cache_size = 3  # GB, as the engine's 3 GiB in bench.offline
    scheduler.enable_prefix_caching = False  # the random prompts share nothing; the engine runs without it too
    scheduler.dynamic_split_fuse = True  # chunked prefill mixed with decodes, as the engine schedules
    properties: dict[str, object] = {"INFERENCE_NUM_THREADS": args.threads}
    if args.precision == "f32":
        properties.update({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                           "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})  # fmt: skip
    start = time.perf_counter()
    pipe = ov_genai.ContinuousBatchingPipeline(args.model_ir, scheduler, "CPU", properties)
    load_s = time.perf_counter() - start
    run(pipe, workload["warmup"])
    outputs, elapsed = run(pipe, workload["requests"])
    tokens = sum(len(output) for output in outputs)
    print(f"openvino genai {ov_genai.__version__} ({args.precision}): {tokens} tokens in {elapsed:.2f} s = "
          f"{tokens / elapsed:.1f} tok/s (pipeline ready in {load_s:.1f} s)", flush=True)
    json.dump({"precision": args.precision, "version": ov_genai.__version__, "load_s": load_s, "tokens": tokens,
               "seconds": elapsed, "outputs": outputs}, open(args.out, "w"))  # fmt: skip


if __name__ == "__main__":
    main()
