"""Qwen2 family (Qwen2, Qwen2.5): Llama's architecture with biased q/k/v projections (o_proj has none)."""

from __future__ import annotations

from replicas.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, hf_config: object) -> AttentionOptions:
        # transformers derives `layer_types` from use_sliding_window/max_window_layers; older configs may lack it.
        layer_types = getattr(hf_config, "layer_types", None) or []
        if "sliding_attention" in layer_types or (not layer_types and getattr(hf_config, "use_sliding_window", False)):
            raise ValueError(
                "Qwen2 with use_sliding_window=true (sliding-window attention in some layers) is not supported; "
                "only configs with use_sliding_window=false are"
            )
        return AttentionOptions(qkv_bias=True, o_proj_bias=False)
