"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's log-probability under the logits of the position
before it, its rank and the top alternatives there, accumulated on the request over its prefill chunks."""

from __future__ import annotations

import torch

from replicas.contract import TokenLogprobs
from replicas.input_batch import PromptLogitsSpan
from replicas.intake import Request


@torch.inference_mode()
def score_tokens(logits: torch.Tensor, target_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """Row `i` of `logits` scored against `target_ids[i]`: log-softmax in float32 (no logit bias, penalties or
    temperature, as vLLM), the target's logprob and rank (1 = most likely), and the `num_top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(target_ids, dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    chosen_list = chosen[:, 0].tolist()
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        tops = [dict(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
    else:
        tops = [{} for _ in target_ids]
    return [
        TokenLogprobs(token_id=token_id, logprob=logprob, rank=rank, top=top)
        for token_id, logprob, rank, top in zip(target_ids, chosen_list, ranks, tops)
    ]


def record_prompt_logprobs(
    requests: dict[str, Request], prompt_logits: torch.Tensor, spans: list[PromptLogitsSpan]
) -> None:
    """Append the step's scored prompt tokens to each request's `prompt_logprobs` (rows in the order of `spans`).

    Positions already recorded are skipped: a sequence preempted mid-prefill recomputes its prompt from the start."""
    offset = 0
    for span in spans:
        rows = prompt_logits[offset : offset + span.num_tokens]
        offset += span.num_tokens
        request = requests.get(span.seq.request_id)
        if request is None or request.prompt_logprobs is None:
            continue
        recorded = request.prompt_logprobs
        already = len(recorded) - span.first_token
        if already < 0:
            raise RuntimeError(
                f"prompt logprobs of {span.seq.request_id}: tokens {len(recorded)}..{span.first_token - 1} were "
                "never scored (a prompt-logprobs request must not take prefix-cache hits)"
            )
        if already >= span.num_tokens:
            continue
        start = span.first_token + already
        targets = span.seq.token_ids[start : span.first_token + span.num_tokens]
        recorded.extend(score_tokens(rows[already:], targets, span.seq.params.prompt_logprobs or 0))
