"""`torch.compile` of the model's decoder layers on CPU (Inductor's C++ backend): the elementwise chains around
the GEMMs (RMSNorm and residual adds, RoPE, SiLU·mul) become fused loops; attention stays one opaque op.

One graph serves every layer (parameters are graph inputs, so the 30 layers of a model share one compile) and every
step: the token and sequence counts are dynamic sizes, so a step of any size runs without padding or recompiling.
Compiled artifacts go to Inductor's on-disk cache, so a restart loads them instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch
from torch import nn

from replicas.models.layers import AttentionMetadata, PagedAttention

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "paged-serve" / "inductor"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the `ModuleList` whose entries hold the paged attention layers."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
            isinstance(sub, PagedAttention) for layer in module for sub in layer.modules()
        ):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no ModuleList of layers with paged attention")


def compile_layers(model: nn.Module) -> None:
    """Make each decoder layer call one shared compiled forward (compiled on its first call)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # NOTE: Inductor's default is /tmp/torchinductor_<user>, which a reboot clears; restarts should stay warm. Inductor
    # writes its default into the environment on first use (which may come before this), so that counts as unset.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(DEFAULT_CACHE_DIR)
    # NOTE: without this, a step of 1 token (or 1 sequence, or 1 block) specializes to size 1 and compiles again.
    torch.fx.experimental._config.backed_size_oblivious = True
    # NOTE: and without this, sizes that happen to be equal at the first call (2 sequences, 2 KV heads) are
    # assumed equal forever (duck sizing), so the next step compiles again.
    torch.fx.experimental._config.use_duck_shape = False
    layers = decoder_layers(model)
    compiled = torch.compile(type(layers[0]).forward, dynamic=True)
    for layer in layers:
        layer.forward = types.MethodType(compiled, layer)


@torch.inference_mode()
def warm_up(model: nn.Module, device: torch.device, key_cache: torch.Tensor) -> float:
    """Compile (or load from the cache) before the first request: one 2-sequence forward writing into block 0,
    which nothing owns yet. Returns the seconds it took."""
    start = time.perf_counter()
    block_size = key_cache.shape[1]
    q_len = min(3, block_size)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(q_len, device=device).repeat(2),
        query_start_loc=torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([q_len, q_len], dtype=torch.int32, device=device),
        block_tables=torch.zeros((2, 1), dtype=torch.int32, device=device),
    )
    input_ids = torch.zeros(2 * q_len, dtype=torch.int64, device=device)
    positions = torch.arange(q_len, device=device).repeat(2)
    model(input_ids, positions, metadata)
    return time.perf_counter() - start
