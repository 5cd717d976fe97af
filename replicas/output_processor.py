"""What callers see of each request: incremental text, stop strings, logprobs, and delta / cumulative / best_of
outputs built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from replicas.contract import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from replicas.intake import Request
from replicas.sequence import Sequence

# Prompt tokens a sample's decoder starts from: enough context for the first output token's leading space.
DECODE_CONTEXT_TOKENS = 5


@dataclass(eq=False)
class SampleOutput:
    """One sequence's text and logprobs so far, and how much of it was already reported (delta outputs)."""

    decoder: DecodeStream
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    num_emitted_logprobs: int = 0
    finish_reported: bool = False
    prompt_logprobs_reported: bool = False  # delta outputs: prompt logprobs go in the first output only
    first_token_time: float | None = None
    last_token_time: float | None = None


class OutputProcessor:
    """Owns each sequence's `SampleOutput`: decodes new tokens with `tokenizers`' incremental `DecodeStream`, cuts
    stop strings (which may span tokens), and builds `RequestOutput`s."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer.backend_tokenizer  # the Rust tokenizer a transformers fast tokenizer wraps
        self.samples: dict[int, SampleOutput] = {}  # by seq_id

    def add(self, seq: Sequence, num_resumed_chars: int = 0) -> None:
        """Start `seq`'s output. A resumed sequence (output tokens already) replays them through its decoder, as
        the replica that produced them did: the next delta's text continues theirs (a multi-byte character, a
        leading space), and the text past `num_resumed_chars` (held back there) is sent from here."""
        context = seq.token_ids[max(0, seq.num_prompt_tokens - DECODE_CONTEXT_TOKENS) : seq.num_prompt_tokens]
        sample = SampleOutput(DecodeStream(context, seq.params.skip_special_tokens))
        for token_id in seq.output_token_ids:
            sample.text += sample.decoder.step(self.tokenizer, token_id) or ""
        sample.num_emitted_tokens = seq.num_output_tokens
        sample.num_emitted_chars = min(num_resumed_chars, len(sample.text))
        self.samples[seq.seq_id] = sample

    def remove(self, request: Request) -> None:
        for seq in request.seqs:
            self.samples.pop(seq.seq_id, None)

    def on_token(self, seq: Sequence, token_logprobs: TokenLogprobs | None, now: float) -> bool:
        """Record `seq`'s newest token. Returns True when its text now contains a stop string (cut there)."""
        sample = self.samples[seq.seq_id]
        if sample.first_token_time is None:
            sample.first_token_time = now
        sample.last_token_time = now
        if token_logprobs is not None:
            sample.cumulative_logprob += token_logprobs.logprob
            if seq.params.logprobs is not None:
                sample.logprobs.append(token_logprobs)
        if seq.is_finished and seq.finish_reason == "stop":
            return False  # ended by EOS or a stop token: its text is not part of the output
        delta = sample.decoder.step(self.tokenizer, seq.token_ids[-1])
        return bool(delta) and self._append_text(seq, sample, delta)

    @staticmethod
    def _append_text(seq: Sequence, sample: SampleOutput, delta: str) -> bool:
        previous_length = len(sample.text)
        sample.text += delta
        params = seq.params
        if not params.stop or seq.num_output_tokens < params.min_tokens:
            return False
        longest = max(len(stop) for stop in params.stop)
        search_from = max(0, previous_length - longest + 1)
        hits = [(sample.text.find(stop, search_from), stop) for stop in params.stop]
        hits = [(position, stop) for position, stop in hits if position >= 0]
        if not hits:
            return False
        position, stop = min(hits)
        sample.text = sample.text[: position + len(stop) if params.include_stop_str_in_output else position]
        seq.stop_reason = stop
        return True

    def make_output(self, request: Request, finished: bool) -> RequestOutput | None:
        """The request's output now: deltas since the last one, or everything so far; None when there is nothing
        to report (best_of reports only at the end, when the n best are known)."""
        params = request.params
        if params.num_samples > params.n and not finished:
            return None
        delta = request.output_kind == "delta"
        seqs = request.seqs
        if params.num_samples > params.n:
            seqs = sorted(seqs, key=lambda s: self.samples[s.seq_id].cumulative_logprob, reverse=True)[: params.n]
        completions = []
        for rank, seq in enumerate(seqs):
            index = rank if params.num_samples > params.n else seq.index
            completion = self._completion(seq, index, delta)
            if completion is not None:
                completions.append(completion)
        first = request.seqs[0]
        first_sample = self.samples[first.seq_id]
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None and delta:
            prompt_logprobs = None if first_sample.prompt_logprobs_reported else list(prompt_logprobs)
            first_sample.prompt_logprobs_reported = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            error=request.error,
            error_status=request.error_status,
            metrics=RequestMetrics(request.arrival_time, first.first_scheduled_time, first_sample.first_token_time,
                                   first_sample.last_token_time),  # fmt: skip
            prompt_logprobs=prompt_logprobs,
        )

    def _completion(self, seq: Sequence, index: int, delta: bool) -> CompletionOutput | None:
        sample = self.samples[seq.seq_id]
        token_ids = seq.output_token_ids
        with_logprobs = seq.params.logprobs is not None
        if not delta:
            return CompletionOutput(index, sample.text, token_ids, seq.finish_reason, seq.stop_reason,
                                    list(sample.logprobs) if with_logprobs else None, sample.cumulative_logprob)  # fmt: skip
        new_tokens = token_ids[sample.num_emitted_tokens :]
        if not new_tokens and (not seq.is_finished or sample.finish_reported):
            return None
        text_end = len(sample.text)
        if seq.params.stop and not seq.is_finished:
            # Hold back what could be the start of a stop string: it is cut if the stop string completes.
            text_end = max(sample.num_emitted_chars, text_end - max(len(stop) for stop in seq.params.stop) + 1)
        new_text = sample.text[sample.num_emitted_chars : text_end]
        new_logprobs = sample.logprobs[sample.num_emitted_logprobs :] if with_logprobs else None
        sample.num_emitted_tokens, sample.num_emitted_chars = len(token_ids), text_end
        sample.num_emitted_logprobs = len(sample.logprobs)
        sample.finish_reported = seq.is_finished
        return CompletionOutput(
            index, new_text, new_tokens, seq.finish_reason, seq.stop_reason, new_logprobs, sample.cumulative_logprob
        )
