"""Model families the engine runs, by the `architectures` name in a Hugging Face config.json."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from replicas.models.gpt2 import GPT2LMHeadModel
from replicas.models.llama import LlamaForCausalLM
from replicas.models.mistral import MistralForCausalLM
from replicas.models.qwen2 import Qwen2ForCausalLM

logger = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(hf_config: object) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for architecture in architectures:
        if architecture in MODEL_CLASSES:
            return MODEL_CLASSES[architecture]
    raise ValueError(
        f"model architecture {architectures} is not supported; supported: {', '.join(MODEL_CLASSES)}"
    )


def load_model(model_dir: str, hf_config: object, dtype: torch.dtype, device: torch.device, max_position: int) -> nn.Module:
    """Build the model on `device` and load its safetensors weights (never pickles: no code runs from a checkpoint)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir!r} (only safetensors checkpoints are loaded)")
    cls = model_class(hf_config)
    with torch.device(device):
        model = cls(hf_config, max_position)
    model.to(dtype=dtype)

    def weights():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in tqdm(f.keys(), desc=f"loading {path.name}", unit="tensor", leave=False):
                    yield name, f.get_tensor(name)

    with torch.no_grad():
        model.load_weights(weights())
    # Rotary tables stay fp32 (they are indexed, not multiplied in bulk).
    for layer in model.modules():
        if hasattr(layer, "cos_cache"):
            layer.cos_cache.data = layer.cos_cache.data.float()
            layer.sin_cache.data = layer.sin_cache.data.float()
    return model.eval()
