"""Each attention backend instance owns its state: two engines in one process do not disturb each other."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import pytest
import torch

import kernels
from kernels import torch_backend

from .paged_batches import DEVICE, BatchSpec, PagedBatch, backend_device, make_batch

NUM_LAYERS = 3


@dataclass
class EngineStep:
    """One step of a small engine: a batch per layer, all sharing the step's metadata tensors (as the runner does)."""

    layers: list[PagedBatch]

    def layer_args(self, layer: int) -> tuple:
        first, batch = self.layers[0], self.layers[layer]
        # Every layer reads the same metadata tensor objects, which is what the plan cache keys on.
        return (
            batch.query,
            batch.key_cache,
            batch.value_cache,
            first.query_start_loc,
            first.seq_lens,
            first.block_tables,
            first.scale,
            first.sliding_window,
        )


def make_step(seqs: tuple[tuple[int, int], ...], seed: int, device: torch.device = DEVICE,
              **spec_fields: object) -> EngineStep:  # fmt: skip
    """Layers differ in their Q/K/V (fresh noise on the first layer's), not in the step's shape or block tables."""
    first = make_batch(BatchSpec(seqs, seed=seed, **spec_fields), device=device)
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator).to(tensor)

    layers = [first]
    for _ in range(1, NUM_LAYERS):
        layers.append(
            replace(
                first,
                query=noise(first.query),
                key_cache=first.key_cache + noise(first.key_cache),
                value_cache=first.value_cache + noise(first.value_cache),
            )
        )
    return EngineStep(layers)


# Two engines with different models and batches: one decodes over mixed lengths, the other mixes prefill and decode,
# with a sliding window and another GQA group.
ENGINE_A_STEPS = [((37, 1), (5, 1), (70, 1)), ((38, 1), (6, 1), (71, 1))]
ENGINE_B_STEPS = [((20, 20), (48, 1), (9, 3)), ((21, 1), (49, 1), (10, 1))]
ENGINE_B_SHAPE = {"num_kv_heads": 1, "group": 4, "head_dim": 80, "block_size": 8, "sliding_window": 16}


def make_engine_steps(device: torch.device = DEVICE) -> tuple[list[EngineStep], list[EngineStep]]:
    steps_a = [make_step(seqs, seed=10 + i, device=device) for i, seqs in enumerate(ENGINE_A_STEPS)]
    steps_b = [make_step(seqs, seed=20 + i, device=device, **ENGINE_B_SHAPE) for i, seqs in enumerate(ENGINE_B_STEPS)]
    return steps_a, steps_b


def run_alone(backend: kernels.AttentionBackend, steps: list[EngineStep]) -> list[list[torch.Tensor]]:
    return [[backend.paged_attention(*step.layer_args(layer)) for layer in range(NUM_LAYERS)] for step in steps]


@pytest.fixture(params=["torch", "triton", "cpu_fused"])
def backend_name(request: pytest.FixtureRequest) -> str:
    if request.param == "triton":
        request.getfixturevalue("triton_backend")  # fails clearly if the kernels cannot run here
    if request.param == "cpu_fused":
        request.getfixturevalue("cpu_fused_backend")  # builds the extension if `make setup` has not
    return request.param


def test_load_backend_returns_a_new_instance_each_time(backend_name: str) -> None:
    device = backend_device(backend_name)
    first, second = kernels.load_backend(backend_name, device), kernels.load_backend(backend_name, device)
    assert first is not second
    assert first.name == second.name == backend_name


def test_interleaved_layers_of_two_engines_give_each_its_results_alone(backend_name: str) -> None:
    device = backend_device(backend_name)
    steps_a, steps_b = make_engine_steps(device)
    alone_a = run_alone(kernels.load_backend(backend_name, device), steps_a)
    alone_b = run_alone(kernels.load_backend(backend_name, device), steps_b)

    backend_a, backend_b = kernels.load_backend(backend_name, device), kernels.load_backend(backend_name, device)
    for step_a, step_b, expected_a, expected_b in zip(steps_a, steps_b, alone_a, alone_b):
        for layer in range(NUM_LAYERS):
            torch.testing.assert_close(backend_a.paged_attention(*step_a.layer_args(layer)), expected_a[layer])
            torch.testing.assert_close(backend_b.paged_attention(*step_b.layer_args(layer)), expected_b[layer])


def test_interleaved_engines_each_build_their_padding_plan_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend's plan is shared by a step's layers; another engine's layers in between must not evict it."""
    builds: list[int] = []
    build_plan = torch_backend._build_plan

    def counting_build_plan(*args: object) -> list:
        builds.append(1)
        return build_plan(*args)

    monkeypatch.setattr(torch_backend, "_build_plan", counting_build_plan)
    steps_a, steps_b = make_engine_steps()
    backend_a, backend_b = kernels.load_backend("torch", DEVICE), kernels.load_backend("torch", DEVICE)
    for step_a, step_b in zip(steps_a, steps_b):
        for layer in range(NUM_LAYERS):
            backend_a.paged_attention(*step_a.layer_args(layer))
            backend_b.paged_attention(*step_b.layer_args(layer))
    assert len(builds) == len(steps_a) + len(steps_b)


@pytest.mark.parametrize("parallel_backend", ["torch", "cpu_fused"])
def test_two_engines_stepping_in_parallel_threads_give_each_its_results_alone(
    request: pytest.FixtureRequest, parallel_backend: str
) -> None:
    """Engines in one process step on their own threads; a shared gather workspace would mix their K/V."""
    if parallel_backend == "cpu_fused":
        request.getfixturevalue("cpu_fused_backend")
    device = backend_device(parallel_backend)
    steps_a, steps_b = make_engine_steps(device)
    alone = [run_alone(kernels.load_backend(parallel_backend, device), steps) for steps in (steps_a, steps_b)]
    mismatches: list[str] = []

    def step_repeatedly(name: str, steps: list[EngineStep], expected: list[list[torch.Tensor]]) -> None:
        backend = kernels.load_backend(parallel_backend, device)
        for _ in range(150):
            for step, expected_step in zip(steps, expected):
                for layer in range(NUM_LAYERS):
                    if not torch.equal(backend.paged_attention(*step.layer_args(layer)), expected_step[layer]):
                        mismatches.append(f"engine {name}, layer {layer}")

    threads = [
        threading.Thread(target=step_repeatedly, args=(name, steps, expected))
        for name, steps, expected in zip("ab", (steps_a, steps_b), alone)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches, f"{len(mismatches)} outputs differ from the engine's run alone, first: {mismatches[0]}"
