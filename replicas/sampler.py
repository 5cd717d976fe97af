"""Turns a step's logits into next tokens: penalties, greedy, temperature, top-k, top-p, min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas.sequence import Sequence, TokenLogprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row, when the row asked for logprobs or ranking needs them


class Sampler:
    """Samples one token per row. Rows are sequences; a row's randomness comes from its own generator when its
    request has a seed (so the same seed gives the same tokens whatever else is in the batch), else from the
    engine's generator."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [seq.params for seq in seqs]
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, params)
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, seqs)
        need_logprobs = [p.logprobs is not None or p.num_samples > p.n for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(need_logprobs) else None

        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._processed_probs(logits[rows], [params[i] for i in random_rows])
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; one draw per row per generator.
            noise = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
            if unseeded:
                noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                    generator=self.generator
                )
            for j, i in enumerate(random_rows):
                if seqs[i].generator is not None:
                    noise[j].exponential_(generator=seqs[i].generator)
            token_ids[rows] = (probs / noise).argmax(dim=-1)

        token_list = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, needed in enumerate(need_logprobs):
                if needed:
                    logprobs[i] = _token_logprobs(raw_logprobs[i], token_list[i], params[i].logprobs or 0)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _processed_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        logits = logits / temperatures[:, None]
        top_ks = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < logits.shape[1] for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = apply_top_k_top_p(
                logits,
                torch.tensor(top_ks, device=logits.device),
                torch.tensor(top_ps, dtype=logits.dtype, device=logits.device),
            )
        probs = torch.softmax(logits, dim=-1)
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            min_p = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)
            probs = apply_min_p(probs, min_p)
        return probs


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside the smallest set whose probability reaches top-p."""
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass strictly before it is below top_p (the top token is always kept).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_index, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one, and renormalize."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def apply_logit_bias(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Add each request's per-token bias to its row (OpenAI's `logit_bias`; -100 effectively bans a token)."""
    logits = logits.clone()
    for row, p in enumerate(params):
        if p.logit_bias:
            token_ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=logits.device)
            biases = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row].index_add_(0, token_ids, biases)
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output (as transformers does); presence and frequency penalties over the
    output only (as OpenAI defines them)."""
    logits = logits.clone()
    vocab_size = logits.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64, device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            outputs = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=logits.device)
            counts = torch.bincount(outputs, minlength=vocab_size)[:vocab_size].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    value = logprobs[token_id]
    rank = int((logprobs > value).sum()) + 1
    top: dict[int, float] = {}
    if num_top:
        top_values, top_ids = logprobs.topk(num_top)
        top = dict(zip(top_ids.tolist(), top_values.tolist()))
    return TokenLogprobs(token_id=token_id, logprob=float(value), rank=rank, top=top)
