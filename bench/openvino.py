"""This engine against OpenVINO GenAI (the fastest CPU engine on PyPI measured here) on bench.offline's mixed workload:
the same seeded prompt ids, greedy, EOS ignored, the same thread count, in one run beside one GEMM peak.

    python -m bench.openvino --setup   # once: a venv of its own (.venv-openvino) and the model exported to IR
    python -m bench.openvino           # ours in fp32, OpenVINO in fp32 and with its CPU defaults

OpenVINO lives in its own venv: its exporter needs a transformers older than this project's (4.x reads the RoPE
base from `rope_theta`, which 5.x writes under `rope_parameters`: the export gets a config with both, else the IR
is another model and its greedy outputs follow ours for a few tokens only). Prints tok/s, the fraction of the fp32
GEMM peak (2 x parameters per computed token + attention, as bench.offline counts) and how far each one's greedy
outputs follow ours; writes bench/results/openvino-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.machine import cpu_flags, cpu_model
from bench.offline import (
    greedy_agreement,
    make_workload,
    measure_gemm_peak,
    peak_fraction,
    run_engine,
    workload_flops,
    workload_llm,
)
from replicas.default_model import DEFAULT_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RUNNER = REPO_ROOT / "bench" / "baselines" / "openvino_genai_runner.py"
# The versions measured; optimum-intel exports with transformers 4.x (constraints.txt keeps torch at the local wheel).
PACKAGES = ["openvino==2026.4.1", "openvino-genai==2026.4.1.0", "openvino-tokenizers==2026.4.1.0",
            "optimum-intel[openvino]==1.27.0", "optimum==2.1.0", "transformers==4.57.6", "datasets==4.0.0"]  # fmt: skip

EXPORT = """
import json, os, sys, tempfile
import openvino as ov
from openvino_tokenizers import convert_tokenizer
from optimum.intel import OVModelForCausalLM
from transformers import PreTrainedTokenizerFast
source, out = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as staged:
    for name in os.listdir(source):
        if name != "config.json":
            os.symlink(os.path.join(source, name), os.path.join(staged, name))
    config = json.load(open(os.path.join(source, "config.json")))
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    json.dump(config, open(os.path.join(staged, "config.json"), "w"))
    OVModelForCausalLM.from_pretrained(staged, export=True, load_in_8bit=False, compile=False).save_pretrained(out)
tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(source, "tokenizer.json"))
encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
ov.save_model(encoder, os.path.join(out, "openvino_tokenizer.xml"))
ov.save_model(decoder, os.path.join(out, "openvino_detokenizer.xml"))
print("exported", out)
"""


def setup(venv: Path, model: Path, ir_dir: Path) -> None:
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO_ROOT / "constraints.txt")]
    print(f"installing {', '.join(PACKAGES)} into {venv} ...", flush=True)
    subprocess.run(pip + PACKAGES, check=True)
    print(f"exporting {model} to OpenVINO IR (fp32 weights) in {ir_dir} ...", flush=True)
    ir_dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(venv / "bin" / "python"), "-c", EXPORT, str(model), str(ir_dir)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def run_openvino(venv: Path, ir_dir: Path, precision: str, threads: int, workload_file: Path) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(venv / "bin" / "python"), str(RUNNER), "--model-ir", str(ir_dir), "--precision", precision,
                        "--threads", str(threads), "--workload", str(workload_file), "--out", out.name],
                       check=True)  # fmt: skip
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the OpenVINO venv and export the model, then stop")
    parser.add_argument("--venv", type=Path, default=REPO_ROOT / ".venv-openvino")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--ir", type=Path, default=None, help="the exported IR (default build/openvino/<model>-fp32)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="both engines' threads (default: the CPUs given)")
    parser.add_argument("--precisions", default="f32,default", help="OpenVINO runs, comma-separated")
    args = parser.parse_args()
    ir_dir = args.ir or REPO_ROOT / "build" / "openvino" / f"{args.model.name}-fp32"
    if args.setup:
        setup(args.venv, args.model, ir_dir)
        return
    if not (ir_dir / "openvino_model.xml").exists():
        sys.exit(f"no OpenVINO IR at {ir_dir}: run `python -m bench.openvino --setup` first")

    args.dtype = "float32"
    llm = workload_llm(args)
    threads = llm.engine.config.resolved_num_threads()
    torch.set_num_threads(threads)
    vocab_size = llm.engine.vocab_size
    workload = make_workload(args.num_requests, args.seed, vocab_size)
    flops = workload_flops(llm.engine.model_runner.model, llm.engine.model_runner.hf_config, workload)
    print(f"cpu: {cpu_model()}; flags {' '.join(cpu_flags())}; {threads} threads; {len(workload)} requests, "
          f"{flops / 1e12:.2f} TFLOP")  # fmt: skip
    peak = measure_gemm_peak()
    print(f"measured float32 GEMM peak: {peak / 1e9:.1f} GFLOP/s", flush=True)

    reference: list[list[int]] = []
    ours = []
    for attempt in range(2):
        tokens, elapsed, _ = run_engine(llm, workload, reference if attempt == 0 else None)
        ours.append(tokens / elapsed)
    del llm
    results: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "threads": threads, "num_requests": len(workload), "workload_tflop": flops / 1e12,
        "engine_fp32_tok_s": ours,
    }  # fmt: skip
    rows = [("this engine, fp32", max(ours), 1.0)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as workload_file:
        warmup = make_workload(16, args.seed + 1, vocab_size)  # as bench.offline warms its engine
        json.dump({"warmup": [[r.prompt_token_ids, r.max_tokens] for r in warmup],
                   "requests": [[r.prompt_token_ids, r.max_tokens] for r in workload]}, workload_file)  # fmt: skip
        workload_file.flush()
        for precision in args.precisions.split(","):
            run = run_openvino(args.venv, ir_dir, precision, threads, Path(workload_file.name))
            agreement = greedy_agreement(reference, run.pop("outputs"))
            results[f"openvino_{precision}"] = {**run, "tok_s": run["tokens"] / run["seconds"], **agreement}
            rows.append((f"OpenVINO GenAI {run['version']}, {precision}", run["tokens"] / run["seconds"],
                         agreement["identical_outputs"]))  # fmt: skip
    peak_after = measure_gemm_peak()
    results["gemm_peak_gflops"] = [peak / 1e9, peak_after / 1e9]
    print(f"\nfloat32 GEMM peak {peak / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after\n")
    print("| engine | tok/s | of the fp32 GEMM peak | greedy outputs identical to ours |")
    print("|---|---:|---:|---:|")
    for name, tok_s, identical in rows:
        print(f"| {name} | {tok_s:.1f} | {peak_fraction(flops, tok_s, workload, peak):.0%} | {identical:.1%} |")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"openvino-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
