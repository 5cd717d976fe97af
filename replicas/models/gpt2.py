"""GPT-2 family (GPT-2, DistilGPT2): learned absolute positions, LayerNorm with bias, GELU MLP, multi-head attention."""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from replicas.models.layers import AttentionMetadata, CheckpointParams, PagedAttention

# transformers' activation names; gelu_new is the tanh approximation, which torch computes in one kernel.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

# HF keeps these as Conv1D, whose weight is [in, out]: transposed when loaded into nn.Linear ([out, in]).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Old checkpoints saved the causal-mask buffers; they are not weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")


def check_gpt2_config(hf_config: object) -> None:
    """Reject the GPT-2 options this implementation does not reproduce, rather than generate different text."""
    if getattr(hf_config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=true is not supported (only the default, false)")
    if getattr(hf_config, "add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=true (an encoder-decoder) is not supported")
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        supported = ", ".join(ACTIVATIONS)
        raise ValueError(f"GPT-2 activation_function {activation!r} is not supported (supported: {supported})")


class GPT2Attention(nn.Module):
    def __init__(self, hf_config: object, layer_index: int) -> None:
        super().__init__()
        self.hidden_size = hf_config.n_embd
        self.num_heads = hf_config.n_head
        self.head_dim = self.hidden_size // self.num_heads
        # The same scale as transformers' GPT2Attention, both options included.
        scale = self.head_dim**-0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_index + 1)
        self.c_attn = nn.Linear(self.hidden_size, 3 * self.hidden_size)
        self.c_proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        query, key, value = self.c_attn(hidden).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = self.attn(query, key, value, metadata)
        return self.c_proj(out.reshape(-1, self.hidden_size))


class GPT2MLP(nn.Module):
    def __init__(self, hf_config: object) -> None:
        super().__init__()
        inner_size = getattr(hf_config, "n_inner", None) or 4 * hf_config.n_embd
        self.c_fc = nn.Linear(hf_config.n_embd, inner_size)
        self.c_proj = nn.Linear(inner_size, hf_config.n_embd)
        self.act = ACTIVATIONS[getattr(hf_config, "activation_function", "gelu_new")]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPT2Block(nn.Module):
    def __init__(self, hf_config: object, layer_index: int) -> None:
        super().__init__()
        eps = hf_config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hf_config.n_embd, eps=eps)
        self.attn = GPT2Attention(hf_config, layer_index)
        self.ln_2 = nn.LayerNorm(hf_config.n_embd, eps=eps)
        self.mlp = GPT2MLP(hf_config)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2LMHeadModel(nn.Module):
    """Module names follow the checkpoint's (less its `transformer.` prefix), so weights load by name."""

    def __init__(self, hf_config: object, max_position: int) -> None:
        super().__init__()
        check_gpt2_config(hf_config)
        self.hf_config = hf_config
        hidden_size = hf_config.n_embd
        self.wte = nn.Embedding(hf_config.vocab_size, hidden_size)
        # All n_positions rows, as in the checkpoint; the model runner keeps positions below max_position.
        self.wpe = nn.Embedding(hf_config.n_positions, hidden_size)
        self.h = nn.ModuleList(GPT2Block(hf_config, i) for i in range(hf_config.n_layer))
        self.ln_f = nn.LayerNorm(hidden_size, eps=hf_config.layer_norm_epsilon)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(hidden_size, hf_config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden, metadata)
        return self.ln_f(hidden)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # untied, or packed (replicas/models/packed_linear.py)
            return self.lm_head(hidden)
        return F.linear(hidden, self.wte.weight)

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.h]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = CheckpointParams(self)
        for name, tensor in weights:
            name = name.removeprefix("transformer.")
            if MASK_BUFFER.search(name) or (name == "lm_head.weight" and self.lm_head is None):
                continue
            params[name].data.copy_(tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor)
        params.check_all_loaded()
