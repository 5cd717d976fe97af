"""Llama family (Llama 2/3, SmolLM2, ...): GQA, RMSNorm, SwiGLU, RoPE with its scaling variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from replicas.models.layers import (
    AttentionMetadata,
    CheckpointParams,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    silu_and_mul,
)


@dataclass(frozen=True)
class AttentionOptions:
    """Where Llama-like families differ in attention (Qwen2: biased q/k/v only; Mistral: a sliding window)."""

    qkv_bias: bool = False
    o_proj_bias: bool = False
    sliding_window: int | None = None


class LlamaAttention(nn.Module):
    def __init__(self, hf_config: object, rotary: RotaryEmbedding, options: AttentionOptions) -> None:
        super().__init__()
        hidden_size = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hidden_size // self.num_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v share one GEMM; the loader stacks the three checkpoint matrices.
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=options.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=options.o_proj_bias)
        self.rotary = rotary
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, options.sliding_window
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(-1, self.num_heads, self.head_dim)
        key = key.view(-1, self.num_kv_heads, self.head_dim)
        value = value.view(-1, self.num_kv_heads, self.head_dim)
        query, key = self.rotary(positions, query, key)
        out = self.attn(query, key, value, metadata)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: object) -> None:
        super().__init__()
        bias = bool(getattr(hf_config, "mlp_bias", False))
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported for Llama (only silu)")
        self.gate_up_proj = nn.Linear(hf_config.hidden_size, 2 * hf_config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(hf_config.intermediate_size, hf_config.hidden_size, bias=bias)
        self.cpu_ops: Any = None  # the fused CPU extension's ops (layers.bind_cpu_ops)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(hidden), self.cpu_ops))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: object, rotary: RotaryEmbedding, options: AttentionOptions) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, rotary, options)
        self.mlp = LlamaMLP(hf_config)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer on the residual stream, which is `residual + hidden` (just `hidden` before the first layer).
        Returns the MLP's output and the stream before it: each add is fused with the norm that follows it."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    # Checkpoint names that load into one fused parameter: (fused name, part name, index of the part).
    stacked_params = (
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, hf_config: object, max_position: int) -> None:
        super().__init__()
        self.hf_config = hf_config
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rotary = RotaryEmbedding(hf_config, head_dim, max_position)
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        options = self.attention_options(hf_config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, rotary, options) for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)

    @classmethod
    def attention_options(cls, hf_config: object) -> AttentionOptions:
        """How this family's attention differs from the plain one; subclasses (other families) override it."""
        bias = bool(getattr(hf_config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_proj_bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        return self.norm.add_and_norm(hidden, residual)[0]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # untied, or packed (replicas/models/packed_linear.py)
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = CheckpointParams(self)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            for fused, part, index in self.stacked_params:
                if f".{part}." in name:
                    _load_part(params[name.replace(part, fused)], tensor, index, self._part_sizes(fused))
                    break
            else:
                params[name].data.copy_(tensor)
        params.check_all_loaded()

    def _part_sizes(self, fused: str) -> list[int]:
        attn = self.layers[0].self_attn
        if fused == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        return [self.hf_config.intermediate_size] * 2


def _load_part(param: nn.Parameter, tensor: torch.Tensor, index: int, sizes: list[int]) -> None:
    start = sum(sizes[:index])
    param.data[start : start + sizes[index]].copy_(tensor)
