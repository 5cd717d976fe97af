"""Compile the Triton kernels for a CUDA GPU on a machine without one.

The interpreter runs kernels as Python and accepts code that Triton's compiler rejects (loop-carried types, dot
shapes, shared-memory budgets), so this runs the real host code on CPU tensors, records each launch instead of
running it, and compiles the recorded launch to a cubin for the target GPU with Triton's bundled ptxas.
It must run without TRITON_INTERPRET: `python -m tests.kernels.cuda_compile [--all]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("cuda_compile compiles for a GPU: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_backend  # noqa: E402

from .paged_batches import BatchSpec, make_batch  # noqa: E402

TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}
# Shared memory a block may use, per SM version (CUDA programming guide, "Compute capabilities").
MAX_SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
KERNEL_NAMES = ("paged_attention_kernel", "reduce_segments_kernel", "_write_kv_cache_kernel", "_copy_blocks_kernel")


class LaunchRecorder:
    """Stands in for a kernel: `kernel[grid](...)` records the call instead of running it."""

    def __init__(self, kernel: Any, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def compile_launch(kernel: Any, args: tuple, kwargs: dict, target: GPUTarget) -> Any:
    constexprs = {name: value for name, value in kwargs.items() if name in kernel.arg_names}
    options = {name: value for name, value in kwargs.items() if name not in kernel.arg_names}
    if "UPCAST" in constexprs:
        constexprs["UPCAST"] = False  # the host saw CPU tensors; a GPU launch keeps fp16/bf16 dots
    signature = {}
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target, options=options)


def attention_call(spec: BatchSpec, cache_dtype: torch.dtype, query_dtype: torch.dtype, **kwargs: Any):
    batch = make_batch(spec, cache_dtype=cache_dtype, query_dtype=query_dtype)
    return lambda: triton_backend.paged_attention(*batch.attention_args(), **kwargs)


def cache_op_calls(dtype: torch.dtype) -> list[Callable[[], None]]:
    key_cache = torch.zeros(8, 16, 3, 80, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    new_rows = torch.randn(5, 3, 80, dtype=torch.bfloat16)
    slot_mapping = torch.tensor([0, -1, 33, 34, 90])
    mapping = torch.tensor([[1, 2], [3, 4]])
    return [
        lambda: triton_backend.write_kv_cache(new_rows, new_rows, key_cache, value_cache, slot_mapping),
        lambda: triton_backend.copy_blocks([key_cache], [value_cache], mapping),
    ]


def calls(everything: bool) -> list[Callable[[], None]]:
    """Host calls whose launches get compiled: a few representative ones, or every dtype, head dim and group."""
    mixed = ((200, 200), (90, 1), (64, 9))
    decodes = ((3000, 1), (40, 1))
    result = [
        attention_call(BatchSpec(mixed, num_kv_heads=2, group=4, head_dim=128), torch.float16, torch.float16),
        attention_call(
            BatchSpec(decodes, num_kv_heads=1, group=3, head_dim=80, sliding_window=512),
            torch.bfloat16,
            torch.bfloat16,
            split_k=True,
            num_segments=5,
        ),
        attention_call(BatchSpec(mixed, num_kv_heads=1, group=8, head_dim=96), torch.float32, torch.float32),
        *cache_op_calls(torch.float16),
    ]
    if everything:
        # Every dtype x head dim, with the GQA groups rotated through them so each dtype meets every group.
        for dtype_index, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
            for dim_index, head_dim in enumerate((64, 80, 96, 128)):
                group = (1, 2, 3, 4, 8)[(dtype_index + dim_index) % 5]
                for seqs, split_k in ((mixed, False), (decodes, True)):
                    spec = BatchSpec(seqs, num_kv_heads=1, group=group, head_dim=head_dim, block_size=16)
                    result.append(attention_call(spec, dtype, torch.float16, split_k=split_k))
            result.extend(cache_op_calls(dtype))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every cache dtype, head dim and GQA group")
    parser.add_argument(
        "--arch", type=int, action="append", choices=sorted(MAX_SHARED_MEMORY), help="SM version(s); default 90"
    )
    cli = parser.parse_args()

    launches: list = []
    for name in KERNEL_NAMES:
        setattr(triton_backend, name, LaunchRecorder(getattr(triton_backend, name), launches))
    triton_backend.INTERPRETED = True  # let the host code accept CPU tensors; nothing runs
    for call in calls(cli.all):
        call()
    failures = []
    for arch in cli.arch or [90]:
        for kernel, args, kwargs in launches:
            compiled = compile_launch(kernel, args, kwargs, GPUTarget("cuda", arch, 32))
            shared = compiled.metadata.shared
            print(f"sm_{arch} {kernel.__name__}: {shared} B shared memory")
            if shared > MAX_SHARED_MEMORY[arch]:
                failures.append(f"sm_{arch} {kernel.__name__} {dict(kwargs)} needs {shared} B of shared memory")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()
