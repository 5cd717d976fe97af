"""bench.roofline: each step's floor on a machine given by its peak and bandwidth, and the steps it records."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.roofline import Machine, ModelCost, StepShape, recorded_steps
from replicas import LLM, SamplingParams

MACHINE = Machine(peak_flops=1e12, bandwidth=1e10)  # 100 FLOPs per byte balance


def cost() -> ModelCost:
    return ModelCost(decoder_linears=[(64, 256), (256, 64)], lm_head=(64, 1000), weight_bytes=4,
                     kv_bytes_per_token=512, attention_flops_per_key=1024)  # fmt: skip


def test_a_linear_floor_is_its_weights_at_few_rows_and_its_flops_at_many() -> None:
    shapes = [(64, 256)]
    weights_s = 64 * 256 * 4 / MACHINE.bandwidth
    assert cost().gemm_floor_s(1, shapes, MACHINE) == pytest.approx(weights_s)  # 2 FLOPs per 4 bytes: memory
    # 200 FLOPs per weight element of 4 bytes: 50 per byte, still under the balance of 100
    assert cost().gemm_floor_s(100, shapes, MACHINE) == pytest.approx(weights_s)
    rows = 1000  # 500 FLOPs per byte: compute
    assert cost().gemm_floor_s(rows, shapes, MACHINE) == pytest.approx(2 * rows * 64 * 256 / MACHINE.peak_flops)


def test_a_step_floor_adds_the_layers_the_lm_head_on_sampling_rows_and_attention() -> None:
    decode = StepShape(new_tokens=[1, 1, 1], contexts=[100, 200, 300], num_sampling=3)
    model = cost()
    attention_s = max(1024 * sum(c - 0.5 for c in decode.contexts) / MACHINE.peak_flops,
                      512 * 600 / MACHINE.bandwidth)  # fmt: skip
    expected = (sum(i * o * 4 / MACHINE.bandwidth for i, o in model.decoder_linears)
                + 64 * 1000 * 4 / MACHINE.bandwidth + attention_s)  # fmt: skip
    assert model.step_floor_s(decode, MACHINE) == pytest.approx(expected)
    assert attention_s == pytest.approx(512 * 600 / MACHINE.bandwidth)  # decode attention reads more than it computes
    # A prefill chunk of 500 tokens after 100 cached: its attention FLOPs over the keys each token sees.
    prefill = StepShape(new_tokens=[500], contexts=[600], num_sampling=1)
    assert model.attention_floor_s(prefill, MACHINE) == pytest.approx(1024 * 500 * (600 - 250) / MACHINE.peak_flops)
    assert decode.step_class == "decode 1-7" and prefill.step_class == "prefill"
    assert StepShape([1] * 40, [10] * 40, 40).step_class == "decode 32+"


def test_recorded_steps_are_the_work_the_engine_did(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, max_num_batched_tokens=64,
              enable_prefix_caching=False)  # fmt: skip
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(5, 90))] for _ in range(6)]
    max_tokens = [rng.randint(2, 12) for _ in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    with recorded_steps(llm.engine) as steps:
        outputs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == max_tokens
    # Every prompt token and every output token but the last is computed once; each output token is sampled once.
    assert sum(sum(step.new_tokens) for step in steps) == sum(map(len, prompts)) + sum(max_tokens) - len(prompts)
    assert sum(step.num_sampling for step in steps) == sum(max_tokens)
    assert all(sum(step.new_tokens) <= 64 and step.seconds > 0 for step in steps)
    longest = max(len(p) + n - 1 for p, n in zip(prompts, max_tokens))
    assert max(max(step.contexts) for step in steps) == longest
    assert llm.engine.model_runner.execute.__name__ == "execute"  # the hook is gone
