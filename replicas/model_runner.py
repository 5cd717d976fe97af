"""Owns the model, the KV cache tensors and the persistent input batch; runs one forward pass per step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig

import kernels
from kernels.cpu_features import cpu_has_bf16_compute
from replicas import compilation
from replicas.config import EngineConfig, EngineConfigError
from replicas.input_batch import InputBatch, PromptLogitsSpan, StepInputs
from replicas.models import load_model
from replicas.models.layers import AttentionMetadata, bind_cpu_ops
from replicas.models.packed_linear import can_prepack, prepack_linears
from replicas.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

# Steps with at least this many tokens time the prefill cost per token (smaller ones are bound by reading the
# weights, not by the tokens).
PREFILL_STEP_TOKENS = 64

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelOutput:
    """A step's logits (float32): one row per sequence that samples, and the prompt rows prompt logprobs need."""

    logits: torch.Tensor  # [R, vocab], in the order of the scheduled sequences that produce a token
    prompt_logits: torch.Tensor | None = None  # [K, vocab], the spans' rows one after the other
    prompt_spans: list[PromptLogitsSpan] | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def resolve_dtype(config: EngineConfig, hf_config: object, device: str) -> torch.dtype:
    if config.dtype != "auto":
        dtype = _DTYPES[config.dtype]
    elif device == "cpu":
        # Half-precision GEMMs are emulated (slow) on CPUs without bf16 instructions; with them, bf16 weights halve
        # the bytes each decode GEMM streams, and torch's CPU bf16 GEMM accumulates in fp32.
        if cpu_has_bf16_compute():
            dtype = torch.bfloat16
            logger.info("dtype auto: bfloat16 (this CPU has avx512_bf16 or amx_bf16)")
        else:
            dtype = torch.float32
            logger.info("dtype auto: float32 (this CPU has neither avx512_bf16 nor amx_bf16)")
    else:
        dtype = getattr(hf_config, "dtype", None) or torch.float16
        if dtype == torch.float32:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype


class ModelRunner:
    """Loads the model, allocates one key and one value tensor per layer, runs steps."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=False)
        self.dtype = resolve_dtype(config, self.hf_config, self.device.type)
        max_position = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0)
        self.max_model_len = config.max_model_len or max_position
        if max_position and self.max_model_len > max_position:
            raise EngineConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {max_position}"
            )
        self.model = load_model(config.model, self.hf_config, self.dtype, self.device, max(self.max_model_len, 1))
        # NOTE: not under compile: Dynamo cannot trace oneDNN's opaque packed tensors, and Inductor's own packing
        # (freezing) measured slower here (README, "Compiled layers").
        if config.prepack_weights and not config.compile and can_prepack(self.device, self.dtype):
            prepack_linears(self.model)
        self.backend = kernels.load_backend(config.attention_backend, self.device)
        if self.backend.name == "cpu_fused" and not config.compile:
            # The norms, RoPE and SiLU·mul as the extension's fused loops (compiled layers fuse them themselves).
            bind_cpu_ops(self.model, self.backend.ops)
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else _DTYPES[config.kv_cache_dtype]
        if self.kv_dtype != self.dtype and self.backend.name != "cpu_fused":
            raise EngineConfigError(
                f"kv_cache_dtype={config.kv_cache_dtype} with {self.dtype} compute needs the cpu_fused attention "
                f"backend (it converts as it reads; built by `make setup`), not {self.backend.name}"
            )
        attention_layers = self.model.attention_layers()
        first = attention_layers[0]
        self.kv_spec = KVCacheSpec(
            len(attention_layers), first.num_kv_heads, first.head_dim, config.block_size, self.kv_dtype
        )
        self.num_blocks = self._num_kv_blocks()
        shape = (self.num_blocks, config.block_size, first.num_kv_heads, first.head_dim)
        # NOTE: uninitialized, so a large cache costs no time and no resident memory until its blocks are written;
        # the kernels never read a slot past a sequence's length (tests poison those slots with NaN).
        self.key_caches = [torch.empty(shape, dtype=self.kv_dtype, device=self.device) for _ in attention_layers]
        self.value_caches = [torch.empty(shape, dtype=self.kv_dtype, device=self.device) for _ in attention_layers]
        for layer, key_cache, value_cache in zip(attention_layers, self.key_caches, self.value_caches):
            layer.bind(self.backend, key_cache, value_cache)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %d bytes per token (%s), %.2f GiB, backend %s",
            self.num_blocks,
            config.block_size,
            self.num_blocks * config.block_size,
            self.kv_spec.bytes_per_token,
            str(self.kv_dtype).removeprefix("torch."),
            self.num_blocks * self.kv_spec.bytes_per_block / 1024**3,
            self.backend.name,
        )
        self.input_batch = InputBatch(config.max_num_seqs, self.max_model_len, config.block_size)
        self.compiled = config.compile and self.device.type == "cpu"
        # Seconds per computed token of recent steps of at least PREFILL_STEP_TOKENS tokens (prefill-heavy: the
        # marginal cost of a prompt token here), an exponential average; 0.0 until such a step ran. The request
        # router weighs a prefix-cache hit by it (how long recomputing the prefix would take). NOTE: on CUDA the
        # forward is asynchronous, so this times its launches only.
        self.prefill_seconds_per_token = 0.0
        if self.compiled:
            compilation.compile_layers(self.model)
            seconds = compilation.warm_up(self.model, self.device, self.key_caches[0])
            logger.info("compiled the decoder layers (dynamic token count, one graph) in %.1f s", seconds)

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of these blocks' K and V, every layer: `[num_layers, len(block_ids), block_size, kv_heads,
        head_dim]` each (any thread: a block being rewritten meanwhile yields garbage the caller must discard)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        keys = torch.stack([cache.index_select(0, index) for cache in self.key_caches])
        values = torch.stack([cache.index_select(0, index) for cache in self.value_caches])
        return keys.cpu(), values.cpu()

    def check_block_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """ValueError unless these blocks' K/V (as `read_blocks` returns them) fit this cache: another engine's of
        the same model, block size and KV dtype."""
        spec = self.kv_spec
        expected = (spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim)
        for tensor in (keys, values):
            shape = tuple(tensor.shape)
            if len(shape) != 5 or shape[:1] + shape[2:] != expected or tensor.dtype != spec.dtype:
                raise ValueError(f"K/V of shape {shape} {tensor.dtype} do not fit this cache (layers, blocks, "
                                 f"{', '.join(map(str, expected[1:]))} {spec.dtype} with {spec.num_layers} layers)")
        if keys.shape != values.shape:
            raise ValueError("keys and values differ in shape")

    def write_blocks(self, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill these blocks with K/V shaped as `read_blocks` returns them (`check_block_kv` first)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer, (key_cache, value_cache) in enumerate(zip(self.key_caches, self.value_caches)):
            key_cache.index_copy_(0, index, keys[layer].to(self.device))
            value_cache.index_copy_(0, index, values[layer].to(self.device))

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def _num_kv_blocks(self) -> int:
        """The seed's cache-size formula solved for blocks: budget // (2 * layers * block * kv_heads * dim * bytes)."""
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.config.kv_cache_memory_fraction)
            else:
                budget = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self.kv_spec.bytes_per_block
        needed = -(-self.max_model_len // self.config.block_size)
        if num_blocks < needed:
            raise EngineConfigError(
                f"KV cache budget of {budget} bytes holds {num_blocks} blocks ({num_blocks * self.config.block_size} "
                f"tokens) but one max_model_len={self.max_model_len} sequence needs {needed} blocks "
                f"({needed * self.kv_spec.bytes_per_block} bytes): raise kv_cache_memory_bytes or lower max_model_len"
            )
        return int(num_blocks)

    def execute(self, output: SchedulerOutput) -> ModelOutput:
        """Run one step; returns logits `[R, vocab]`, one row per scheduled sequence that samples, in order, and
        the logits of the prompt positions whose logprobs were asked for."""
        started = time.perf_counter()
        model_output = self._forward(output)
        if output.num_batched_tokens >= PREFILL_STEP_TOKENS:
            per_token = (time.perf_counter() - started) / output.num_batched_tokens
            previous = self.prefill_seconds_per_token
            self.prefill_seconds_per_token = per_token if previous == 0.0 else 0.8 * previous + 0.2 * per_token
        return model_output

    @torch.inference_mode()
    def _forward(self, output: SchedulerOutput) -> ModelOutput:
        if self.device.type == "cpu":
            # NOTE: tiny activations (e.g. squared in RMSNorm) become denormals, which x86 handles in microcode:
            # elementwise ops ran 100x slower. The flag is per thread, and steps may run on any thread.
            torch.set_flush_denormal(True)
        if output.blocks_to_copy:
            mapping = torch.tensor(output.blocks_to_copy, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.key_caches, self.value_caches, mapping)
        inputs = self.input_batch.prepare(output)
        input_ids, positions, metadata, logits_indices = self._to_device(inputs)
        hidden = self.model(input_ids, positions, metadata)
        if inputs.prompt_logits_indices is None:
            return ModelOutput(self.model.compute_logits(hidden[logits_indices]).float())
        prompt_indices = torch.from_numpy(inputs.prompt_logits_indices).to(self.device)
        logits = self.model.compute_logits(hidden[torch.cat([logits_indices, prompt_indices])]).float()
        num_sampling = logits_indices.shape[0]
        return ModelOutput(logits[:num_sampling], logits[num_sampling:], inputs.prompt_spans)

    def _to_device(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.from_numpy(inputs.slot_mapping).to(device),
            query_start_loc=torch.from_numpy(inputs.query_start_loc.astype("int32")).to(device),
            seq_lens=torch.from_numpy(inputs.seq_lens.astype("int32")).to(device),
            block_tables=torch.from_numpy(inputs.block_tables.astype("int32")).to(device),
        )
        return (
            torch.from_numpy(inputs.input_ids).to(device),
            torch.from_numpy(inputs.positions).to(device),
            metadata,
            torch.from_numpy(inputs.logits_indices).to(device),
        )
