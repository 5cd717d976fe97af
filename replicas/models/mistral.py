"""Mistral family: Llama's architecture with sliding-window attention (`sliding_window` in the config; null: off)."""

from __future__ import annotations

from replicas.models.llama import AttentionOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, hf_config: object) -> AttentionOptions:
        # NOTE: like transformers' Mistral, every layer uses the window (a `layer_types` entry is ignored there too).
        return AttentionOptions(sliding_window=getattr(hf_config, "sliding_window", None))
