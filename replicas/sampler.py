"""Turns logits into next tokens: penalties, grammar masks, greedy, temperature, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replicas.contract import TokenLogprobs
from replicas.sampling_params import SamplingParams
from replicas.sequence import Sequence

# NOTE: with top-k/top-p/min-p, candidates come from a top-k of this width instead of a sort of the vocabulary; a
# row whose kept set might reach past it (top-p mass or min-p threshold not reached within it) falls back to a sort.
CANDIDATES = 256
# Up to this vocabulary size, finding top-p's threshold by bucketing (no sort, no top-k) is the cheaper way; beyond
# it, a top-k of CANDIDATES usually holds the kept set and costs less (measured on this 2-core CPU: 2,048 tokens,
# 256 rows: threshold 7 ms, top-256 4 ms plus a 17-ms sort when flat; 49,152 tokens: top-256 27 ms, threshold 300).
THRESHOLD_MAX_VOCAB = 8 * CANDIDATES


def rng_key(seed: int, index: int) -> int:
    """The random stream of sample `index` of a request seeded with `seed`."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64


def seeded_uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) from a counter-based generator (SplitMix64 of key and counter).

    A sample's draw for its k-th token depends on its key and k only: the same whatever else is in the batch, after
    a preemption, or when the request resumes elsewhere from its tokens so far; and a whole batch draws at once.
    """
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # per row, when the row asked for logprobs or ranking needs them


class Sampler:
    """Samples one token per row. Rows are sequences; a seeded row draws from its own counter-based stream (so the
    same seed gives the same tokens whatever else is in the batch), others from the engine's generator."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        if not seqs:  # a step of prompt chunks that produce no token yet
            return SamplerOutput([], [])
        params = [seq.params for seq in seqs]
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, params)
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, seqs)
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if constrained:  # structured outputs: tokens outside each row's grammar get -inf (in place)
            # NOTE: imported here: structured_output imports intake, which imports this module.
            from replicas.structured_output import apply_token_bitmasks

            apply_token_bitmasks(logits, constrained, [seqs[i].grammar.bitmask for i in constrained])
        need_logprobs = [p.logprobs is not None or p.num_samples > p.n for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(need_logprobs) else None

        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(random_rows) == len(seqs):
            token_ids = self._sample(logits, seqs)
        else:
            # The first maximum, as argmax, which is 2.5x slower on CPU (2.2 vs 0.8 ms at 64 x 49152 fp32 logits).
            token_ids = logits.max(dim=-1).indices
            if random_rows:
                rows = torch.tensor(random_rows, device=logits.device)
                token_ids[rows] = self._sample(logits[rows], [seqs[i] for i in random_rows])
        token_list = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, needed in enumerate(need_logprobs):
                if needed:
                    logprobs[i] = _token_logprobs(raw_logprobs[i], token_list[i], params[i].logprobs or 0)
        return SamplerOutput(token_list, logprobs)

    def _uniforms(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        uniforms = torch.rand(len(seqs), dtype=torch.float64, generator=self.generator, device=device)
        seeded = [i for i, seq in enumerate(seqs) if seq.rng_key is not None]
        if seeded:
            keys = np.array([seqs[i].rng_key for i in seeded], dtype=np.uint64)
            counters = np.array([seqs[i].num_output_tokens for i in seeded], dtype=np.uint64)
            uniforms[torch.tensor(seeded, device=device)] = torch.from_numpy(seeded_uniforms(keys, counters)).to(device)
        return uniforms

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Inverse-CDF sampling of each row's processed distribution, with one uniform per row."""
        params = [seq.params for seq in seqs]
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        probs = torch.softmax(logits / temperatures[:, None], dim=-1)
        uniforms = self._uniforms(seqs, logits.device)
        # Rows with top-k sample among their top-k candidates; rows with only top-p/min-p among the tokens above a
        # threshold found without sorting; the others from the whole distribution.
        with_top_k = [i for i, p in enumerate(params) if p.top_k > 0]
        thresholded = [i for i, p in enumerate(params) if p.top_k <= 0 and (p.top_p < 1.0 or p.min_p > 0.0)]
        token_ids = None if len(with_top_k) + len(thresholded) == len(seqs) else _inverse_cdf(probs, uniforms)
        for rows, sample in ((with_top_k, _sample_truncated), (thresholded, _sample_thresholded)):
            if not rows:
                continue
            if len(rows) == len(seqs):
                return sample(probs, uniforms, params)
            if token_ids is None:
                token_ids = torch.empty(len(seqs), dtype=torch.int64, device=logits.device)
            index = torch.tensor(rows, device=logits.device)
            token_ids[index] = sample(probs[index], uniforms[index], [params[i] for i in rows])
        return token_ids


def _sample_thresholded(probs: torch.Tensor, uniforms: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-p and min-p keep every token at or above a per-row probability threshold: sample among those, in
    vocabulary order (the order does not change the distribution)."""
    if probs.shape[1] > THRESHOLD_MAX_VOCAB:
        return _sample_truncated(probs, uniforms, params)
    device = probs.device
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
    min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
    max_probs = probs.max(dim=-1).values
    thresholds = max_probs * min_ps
    if bool((top_ps < 1.0).any()):
        by_p = top_p_thresholds(probs, max_probs, top_ps)
        if by_p is None:  # a threshold bucket too crowded to order cheaply: sort
            return _sample_truncated(probs, uniforms, params)
        thresholds = torch.maximum(thresholds, by_p)
    return _inverse_cdf(probs.masked_fill(probs < thresholds[:, None], 0.0), uniforms)


def top_p_thresholds(
    probs: torch.Tensor, max_probs: torch.Tensor, top_p: torch.Tensor, num_buckets: int = 1024, max_in_bucket: int = 64
) -> torch.Tensor | None:
    """Per row, the probability of the last token top-p keeps (the smallest set of most likely tokens whose mass
    reaches `top_p`), without sorting the vocabulary: tokens fall into buckets by log-probability (the row's range
    split evenly, bucket 0 the likeliest), the buckets' masses locate the bucket holding the threshold, and only
    that bucket's tokens are ordered. None when some row's threshold bucket holds more than `max_in_bucket`."""
    num_rows = probs.shape[0]
    log_probs = probs.clamp_min(1e-30).log_()
    log_max = max_probs.clamp_min(1e-30).log()
    spread = (log_max - log_probs.min(dim=-1).values).clamp_min(1e-6)
    scale = (num_buckets / spread)[:, None]
    buckets = ((log_max[:, None] - log_probs) * scale).long().clamp_(0, num_buckets - 1)
    masses = torch.zeros(num_rows, num_buckets, dtype=torch.float64, device=probs.device)
    masses.scatter_add_(1, buckets, probs.double())
    cumulative = masses.cumsum(dim=-1)
    # The first bucket whose cumulative mass reaches top_p holds the threshold.
    boundary = torch.searchsorted(cumulative, top_p[:, None]).clamp_(max=num_buckets - 1)
    mass_before = cumulative.gather(1, boundary) - masses.gather(1, boundary)
    in_boundary = buckets == boundary
    counts = in_boundary.sum(dim=-1)
    width = int(counts.max())
    if width > max_in_bucket:
        return None
    candidates = probs.masked_fill(~in_boundary, -1.0).topk(width, dim=-1).values  # descending, padded with -1
    running = mass_before + candidates.clamp(min=0.0).double().cumsum(dim=-1)
    # (If rounding keeps the sum short of top_p, the bucket's last token is the threshold: the bucket is kept.)
    last_kept = torch.minimum(torch.searchsorted(running, top_p[:, None]), (counts - 1)[:, None])
    thresholds = candidates.gather(1, last_kept).squeeze(1)
    return torch.where(top_p < 1.0, thresholds, torch.zeros_like(thresholds))


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first column where the cumulative probability exceeds `uniform` x the row's total."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    targets = uniforms * cdf[:, -1]
    return torch.searchsorted(cdf, targets[:, None], right=True).clamp_(max=probs.shape[1] - 1).squeeze(1)


def _sample_truncated(probs: torch.Tensor, uniforms: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab_size = probs.shape[1]
    device = probs.device
    top_ks = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
    min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
    width = min(vocab_size, max(CANDIDATES, max(p.top_k for p in params)))
    sorted_probs, sorted_ids = probs.topk(width, dim=-1)
    if width < vocab_size:
        within = (top_ks <= width) | (sorted_probs.sum(dim=-1) >= top_ps)
        within |= (min_ps > 0) & (sorted_probs[:, -1] < sorted_probs[:, 0] * min_ps)
        if not bool(within.all()):
            sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(dim=-1, dtype=torch.float64)
    num_kept = kept_counts(sorted_probs, cdf, top_ks, top_ps, min_ps, vocab_size)
    # The kept tokens are a prefix of the sorted candidates: sample within it.
    targets = uniforms * cdf.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    positions = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1)
    positions = torch.minimum(positions, num_kept - 1)
    return sorted_ids.gather(1, positions[:, None]).squeeze(1)


def kept_counts(
    sorted_probs: torch.Tensor,
    cdf: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """How many of each row's most likely tokens survive top-k, then top-p over the top-k renormalized, then
    min-p. `sorted_probs` are the row's candidates, descending (a prefix of the vocabulary's order), `cdf` their
    running sum in float64. Each filter keeps a prefix, so the survivors are the first `count` candidates."""
    width = sorted_probs.shape[1]
    num_kept = top_k.clamp(max=width)
    # The top-k set's mass: all of it when top-k is off (the candidates may be only a prefix of the vocabulary).
    k_mass = torch.where(top_k < vocab_size, cdf.gather(1, (num_kept - 1)[:, None]).squeeze(1), 1.0)
    if bool((top_p < 1.0).any()):
        # Keep a token while the mass strictly before it is below top_p (the top token is always kept).
        mass_before = (cdf - sorted_probs).contiguous()
        by_p = torch.searchsorted(mass_before, (top_p * k_mass)[:, None].contiguous()).squeeze(1)
        num_kept = torch.minimum(num_kept, by_p.clamp(min=1))
    if bool((min_p > 0).any()):
        by_min_p = (sorted_probs >= sorted_probs[:, :1] * min_p[:, None]).sum(dim=-1)
        num_kept = torch.minimum(num_kept, by_min_p)
    return num_kept


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
