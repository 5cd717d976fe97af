"""CPU Linear layers with weights reordered once at load into a GEMM library's packed layout.

MKL multiplies the plain `[out, in]` weight and splits skinny GEMMs (decode steps: M <= 64 rows) poorly over
threads. A weight packed once at load runs them faster on the same cores (`python -m bench.offline --prepack-ab`);
it is the packing Inductor's freezing does, without a compile:
- float32: MKL's packed sgemm (`cblas_sgemm_pack` / `cblas_sgemm_compute`). Against oneDNN's packed weights below,
  the default model's 120 decoder GEMMs ran 1.31x faster at 64 rows, 1.14x at 32, 1.0-1.1x below 32 rows and at
  prefill sizes (`python -m bench.packed_gemm`; Xeon, 2 threads). MKL keeps nothing per shape.
- bfloat16 (CPUs with AMX or AVX512_BF16; MKL has no packed bf16 GEMM): oneDNN's `_linear_pointwise`. NOTE: oneDNN
  creates and caches a primitive per distinct row count, with memory of its own: unpadded, a replica serving varied
  step sizes grew by ~400 MiB over its first thousand requests (bench.soak); rows are padded to a bounded set
  (`padded_rows`), and a 30-minute soak then grew each replica by at most 2.9%.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_features import cpu_has_bf16_compute

logger = logging.getLogger(__name__)

# The row count oneDNN is told to expect when choosing the blocked layout: a decode batch.
PACK_BATCH_HINT = 64


def padded_rows(rows: int) -> int:
    """The row count oneDNN is given: a power of two up to 8, then a multiple of 16. NOTE: oneDNN builds (and keeps
    memory for) a primitive per distinct shape; unpadded, every step size is one more, and a server's memory grows
    for as long as new sizes come (hundreds of MiB). Padded, there are at most 4 + max_num_batched_tokens / 16."""
    if rows <= 8:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 16) * 16


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to CPU fp32 weights, and bf16 ones where the CPU multiplies bf16 natively (AMX or
    AVX512_BF16: packed, a decode step's bf16 GEMMs ran 1.3-1.8x plain `F.linear` on a Xeon with AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16_compute())


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with `W` held in MKL's (float32) or oneDNN's (bfloat16) packed layout (the plain weight is
    dropped: no second copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.uses_mkl = weight.dtype == torch.float32 and torch.backends.mkl.is_available()
        if self.uses_mkl:
            self.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
            # `_mkl_linear` reads only the plain weight's shape and dtype when it runs the packed GEMM (it does for
            # any row count it is told is the packing's): a one-element stand-in keeps the memory of a single copy.
            self._weight_shape = torch.zeros(1, dtype=weight.dtype).expand(weight.shape)
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if self.uses_mkl:
            # NOTE: MKL's packed B serves any M (tested against float64 on row counts 1-2,048); torch takes the
            # packed path only when M equals the op's last argument (else it multiplies the plain weight): pass M.
            packed, shape = self.packed_weight, self._weight_shape
            return torch.ops.mkl._mkl_linear(hidden.contiguous(), packed, shape, self.bias, rows)
        padded = padded_rows(rows)
        if padded != rows:
            hidden = F.pad(hidden, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.packed_weight, self.bias, "none", [], "")
        return out[:rows]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear`; a tied output projection gets its own packed copy
    of the embedding (the lookup keeps the plain one). Returns how many were packed."""
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight, child.bias))
                packed += 1
    if getattr(model, "lm_head", False) is None:  # tied to the input embedding
        model.lm_head = PackedLinear(model.get_input_embeddings().weight, None)
        packed += 1
    logger.info("prepacked %d Linear weights (fp32: MKL's packed layout; bf16: oneDNN's)", packed)
    return packed
