"""write_kv_cache and copy_blocks of every backend: exactly the addressed slots and blocks change."""

from __future__ import annotations

import pytest
import torch

from kernels import torch_backend

from .paged_batches import BatchSpec, backend_device, make_batch, reference_attention, relative_error

CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["torch", "triton", "cpu_fused"])
def backend(request: pytest.FixtureRequest, triton_backend):
    if request.param == "cpu_fused":
        return request.getfixturevalue("cpu_fused_backend")
    return triton_backend if request.param == "triton" else torch_backend


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of the `backend` under test (the fused CPU kernel's tensors are on CPU even on a GPU machine)."""
    return backend_device(request.node.callspec.params["backend"])


def random_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                 device: torch.device):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=generator).to(dtype).to(device)


def write_random_rows(backend, device: torch.device, dtype: torch.dtype, rows_dtype: torch.dtype,
                      slot_mapping: torch.Tensor):  # fmt: skip
    """Write random rows at `slot_mapping` into random caches; return (caches before, caches after, rows)."""
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 3, 80
    key_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=1, device=device)
    value_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=2, device=device)
    before = (key_cache.clone(), value_cache.clone())
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(len(slot_mapping), num_kv_heads, head_dim, generator=generator).to(rows_dtype)
    value = torch.randn(len(slot_mapping), num_kv_heads, head_dim, generator=generator).to(rows_dtype)
    backend.write_kv_cache(key.to(device), value.to(device), key_cache, value_cache, slot_mapping.to(device))
    flatten = lambda cache: cache.view(num_blocks * block_size, num_kv_heads, head_dim).cpu()  # noqa: E731
    return [flatten(cache) for cache in before], [flatten(key_cache), flatten(value_cache)], (key, value)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_write_kv_cache_writes_slots_and_skips_negative_ones(backend, device: torch.device, dtype: torch.dtype) -> None:
    slot_mapping = torch.tensor([17, -1, 0, 47, -1, 30, 8], dtype=torch.int64)
    before, after, rows = write_random_rows(backend, device, dtype, dtype, slot_mapping)
    written = slot_mapping >= 0
    untouched = torch.ones(after[0].shape[0], dtype=torch.bool)
    untouched[slot_mapping[written]] = False
    for cache_before, cache_after, new_rows in zip(before, after, rows):
        assert torch.equal(cache_after[slot_mapping[written]], new_rows[written])
        assert torch.equal(cache_after[untouched], cache_before[untouched])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_cache_casts_rows_to_the_cache_dtype(backend, device: torch.device, dtype: torch.dtype) -> None:
    slot_mapping = torch.tensor([5, 44, 12], dtype=torch.int64)
    _, after, rows = write_random_rows(backend, device, dtype, torch.float32, slot_mapping)
    # Within one unit in the last place: Triton's interpreter truncates fp32 -> bf16 where CUDA and torch round.
    one_ulp = torch.finfo(dtype).eps
    for cache_after, new_rows in zip(after, rows):
        torch.testing.assert_close(cache_after[slot_mapping].float(), new_rows, rtol=one_ulp, atol=0)


@pytest.mark.parametrize("name", ["triton", "cpu_fused"])
def test_write_kv_cache_reads_strided_rows(request: pytest.FixtureRequest, name: str) -> None:
    """K and V sliced out of a fused QKV projection (row stride larger than the row) are written correctly."""
    backend, device = request.getfixturevalue(f"{name}_backend"), backend_device(name)
    num_kv_heads, head_dim = 2, 64
    key_cache = random_cache(4, 16, num_kv_heads, head_dim, torch.float32, seed=4, device=device)
    value_cache = random_cache(4, 16, num_kv_heads, head_dim, torch.float32, seed=5, device=device)
    fused = torch.randn(5, 6, head_dim, device=device)  # [T, q heads + k heads + v heads, head_dim]
    key, value = fused[:, 2:4], fused[:, 4:6]
    slot_mapping = torch.tensor([3, 60, 21, 22, 40], device=device)
    backend.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    assert torch.equal(key_cache.view(-1, num_kv_heads, head_dim)[slot_mapping], key)
    assert torch.equal(value_cache.view(-1, num_kv_heads, head_dim)[slot_mapping], value)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_copy_blocks_copies_in_every_layer_and_nothing_else(backend, device: torch.device, dtype: torch.dtype) -> None:
    num_layers, num_blocks = 3, 7
    key_caches = [random_cache(num_blocks, 16, 2, 96, dtype, seed=10 + layer, device=device)
                  for layer in range(num_layers)]  # fmt: skip
    value_caches = [random_cache(num_blocks, 16, 2, 96, dtype, seed=20 + layer, device=device)
                    for layer in range(num_layers)]  # fmt: skip
    key_before = [cache.clone() for cache in key_caches]
    value_before = [cache.clone() for cache in value_caches]
    block_mapping = torch.tensor([[2, 5], [0, 6], [2, 3]], dtype=torch.int64)

    backend.copy_blocks(key_caches, value_caches, block_mapping.to(device))

    destinations = set(block_mapping[:, 1].tolist())
    for caches, before in ((key_caches, key_before), (value_caches, value_before)):
        for cache, old in zip(caches, before):
            for src, dst in block_mapping.tolist():
                assert torch.equal(cache[dst], old[src])
            for block in set(range(num_blocks)) - destinations:
                assert torch.equal(cache[block], old[block])


def test_copy_blocks_with_no_pairs_is_a_no_op(backend, device: torch.device) -> None:
    key_caches = [random_cache(3, 8, 1, 64, torch.float32, seed=0, device=device)]
    value_caches = [random_cache(3, 8, 1, 64, torch.float32, seed=1, device=device)]
    before = key_caches[0].clone()
    backend.copy_blocks(key_caches, value_caches, torch.empty((0, 2), dtype=torch.int64, device=device))
    assert torch.equal(key_caches[0], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_attend(backend, device: torch.device, dtype: torch.dtype) -> None:
    """The step's order of operations: scatter the new tokens' K/V, then attend over the cache."""
    spec = BatchSpec(seqs=((70, 70), (45, 3), (33, 1)), num_kv_heads=2, group=4, head_dim=80, block_size=16, seed=7)
    batch = make_batch(spec, cache_dtype=dtype, device=device)
    ref = reference_attention(*batch.attention_args())
    # Replace the new tokens' slots with garbage, and make the batch write them back.
    flat_key_cache = batch.key_cache.view(-1, spec.num_kv_heads, spec.head_dim)
    flat_value_cache = batch.value_cache.view(-1, spec.num_kv_heads, spec.head_dim)
    flat_key_cache[batch.slot_mapping] = 1e4
    flat_value_cache[batch.slot_mapping] = -1e4
    backend.write_kv_cache(batch.key, batch.value, batch.key_cache, batch.value_cache, batch.slot_mapping)
    out = backend.paged_attention(*batch.attention_args())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(out, ref) < tolerance
