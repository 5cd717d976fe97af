"""Closed-loop load generator: N users send `POST /generate` requests back to back and read the answers as SSE.

One request stream per workload (seeded), the same for every system: users take the next request from it when
their previous one is answered. Each load level starts with a warm-up that is not measured (all users start at
once, so a continuous-batching server first prefills every prompt together, and its requests finish in step
until their lengths spread them out); it ends after `warmup_s`, or earlier once `warmup_completions` requests
have completed. Then the measured window of `duration_s` runs with every user still sending (kept open until the
server's first answer in it, for servers answering in bursts further apart than the window); then no new
requests start, the ones in flight get `drain_s` to finish, and whatever is still open is cancelled (reported as
censored, not dropped).

Statistics (see `summarize`), over the measured window only:
- throughput: tokens delivered in the window divided by the time from the last delivery before it to the last
  delivery in it (a server that answers in bursts, such as a static batch, is measured from burst to burst, not
  over a partial interval at either end); with no delivery before the window, from the end of its first burst;
  over the whole window if deliveries never pause (a lower bound: one burst cannot be timed);
  request rate = throughput ÷ the mean tokens of a completed request (a closed loop's first requests finish in
  waves that a 30-s window of completions would see as bursts);
- latency, TTFT: over the requests that started in the window (they may complete in the drain); a censored
  request counts as longer than any completed one, so a percentile it reaches is reported as a lower bound
  (`inf`) and the mean falls back to Little's law, users / request rate, which holds for a closed loop without
  think time;
- ``python -m bench.loadgen URL --users 8`` drives any server with this API by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    seed: int | None = None
    prompt_tokens: int = 0  # as the workload builder counted them

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True,
                                "stream": True, "temperature": self.temperature}  # fmt: skip
        if self.n != 1:
            body["n"] = self.n
        if self.seed is not None:
            body["seed"] = self.seed
        return body


# --- workloads -------------------------------------------------------------------------------------------------


def word_vocabulary(tokenizer: Any) -> list[str]:
    """Vocabulary entries that are one space-prefixed lowercase word: a prompt of k of them is about k tokens."""
    words = []
    for token in tokenizer.get_vocab():
        if token.startswith("Ġ") and token[1:].isalpha() and token[1:].islower() and len(token) >= 4:
            words.append(token[1:])
    if not words:
        raise ValueError("the tokenizer has no space-prefixed word tokens to build prompts from")
    return sorted(words)


def _text(rng: random.Random, words: Sequence[str], num_words: int) -> str:
    return " ".join(rng.choice(words) for _ in range(num_words))


def mixed_workload(words: Sequence[str], num_requests: int, seed: int, prompt_len: tuple[int, int] = (32, 256),
                   output_len: tuple[int, int] = (64, 128)) -> list[RequestSpec]:  # fmt: skip
    """Independent prompts of uniformly drawn lengths; greedy outputs of uniformly drawn lengths (EOS ignored)."""
    rng = random.Random(seed)
    specs = []
    for _ in range(num_requests):
        length = rng.randint(*prompt_len)
        specs.append(RequestSpec(_text(rng, words, length), rng.randint(*output_len), prompt_tokens=length))
    return specs


def shared_prefix_workload(words: Sequence[str], num_requests: int, seed: int, prefix_len: int = 512,
                           tail_len: tuple[int, int] = (16, 64),
                           output_len: tuple[int, int] = (64, 128)) -> list[RequestSpec]:  # fmt: skip
    """One system prompt of `prefix_len` words shared by every request, then a unique question."""
    rng = random.Random(seed)
    system = _text(rng, words, prefix_len)
    specs = []
    for _ in range(num_requests):
        tail = rng.randint(*tail_len)
        specs.append(RequestSpec(f"{system}\n{_text(rng, words, tail)}", rng.randint(*output_len),
                                 prompt_tokens=prefix_len + 1 + tail))  # fmt: skip
    return specs


def parallel_sampling_workload(words: Sequence[str], num_requests: int, seed: int, n: int = 4,
                               prompt_len: tuple[int, int] = (32, 256),
                               output_len: tuple[int, int] = (64, 128)) -> list[RequestSpec]:  # fmt: skip
    """`n` sampled completions per prompt (temperature 1, seeded per request)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        length = rng.randint(*prompt_len)
        specs.append(RequestSpec(_text(rng, words, length), rng.randint(*output_len), n=n, temperature=1.0,
                                 seed=seed * 100_003 + i, prompt_tokens=length))  # fmt: skip
    return specs


# --- one request ----------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    start: float  # seconds since the level started
    prompt_tokens: int = 0
    first_token: float | None = None  # when the first token arrived
    end: float | None = None  # when the answer was complete; None: censored (or failed)
    completion_tokens: int = 0
    deliveries: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) as they arrived
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.end is not None and self.error is None

    @property
    def latency(self) -> float | None:
        return self.end - self.start if self.completed else None

    @property
    def ttft(self) -> float | None:
        return self.first_token - self.start if self.first_token is not None else None


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON payload of one `data:` line; None for blank lines, comments and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]" or not payload:
        return None
    return json.loads(payload)


class StreamError(Exception):
    """A streamed request answered with an error status, or an error event in its stream."""


async def sse_events(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a streamed POST; StreamError for a non-200 answer or an error event."""
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise StreamError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            event = parse_sse_line(line)
            if event is None:
                continue
            if "error" in event:
                raise StreamError(str(event["error"]))
            yield event


async def send(client: httpx.AsyncClient, url: str, spec: RequestSpec, record: RequestRecord, t0: float) -> None:
    """Send one streamed request and fill `record` as events arrive."""
    async with client.stream("POST", url, json=spec.body()) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            record.error = f"HTTP {response.status_code}: {body[:200]}"
            return
        async for line in response.aiter_lines():
            event = parse_sse_line(line)
            if event is None:
                continue
            now = time.perf_counter() - t0
            if "error" in event:
                record.error = str(event["error"].get("message", event["error"]))
                return
            if "usage" in event:
                record.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                continue
            tokens = int(event.get("num_tokens", 0))
            if tokens:
                if record.first_token is None:
                    record.first_token = now
                record.deliveries.append((now, tokens))
                record.completion_tokens += tokens
    record.end = time.perf_counter() - t0


# --- one load level -------------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    users: int
    duration_s: float
    drain_s: float
    records: list[RequestRecord]
    started_at: float = 0.0  # wall clock (time.time()) when the level began
    warmup_s: float = 0.0  # when the measured window began, in seconds since the level started
    ended_s: float = 0.0  # when the requests still open were cut off

    @property
    def window(self) -> tuple[float, float]:
        return self.warmup_s, self.warmup_s + self.duration_s

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.users, self.window)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); `inf` values sort last; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


BURST_GAP_S = 0.25  # events closer than this belong to one burst (a static batch's answers, one engine step)


def rate_in_window(events: Sequence[tuple[float, int]], window: tuple[float, float]) -> tuple[float, int, float]:
    """(span, count, rate) of the `(time, count)` events inside `window`, timed from the last event before the
    window (the end of the previous burst) to the last one inside it, so that a server answering in bursts is
    measured burst to burst. Without an event before the window, from the end of the first burst inside it; when
    the events never pause (one burst), over the whole window."""
    inside = sorted(e for e in events if window[0] <= e[0] <= window[1])
    before = [t for t, _ in events if t < window[0]]
    if before and inside:
        span = inside[-1][0] - max(before)
        count = sum(n for _, n in inside)
        return span, count, count / span if span > 0 else 0.0
    anchor = None
    for previous, event in zip(inside, inside[1:]):
        if event[0] - previous[0] > BURST_GAP_S:
            anchor = previous[0]
            break
    if anchor is None:
        span = window[1] - window[0]
        count = sum(n for _, n in inside)
    else:
        span = inside[-1][0] - anchor
        count = sum(n for t, n in inside if t > anchor)
    return span, count, count / span if span > 0 else 0.0


def summarize(records: Sequence[RequestRecord], users: int, window: tuple[float, float]) -> dict[str, Any]:
    """The level's statistics over the measured `window` (see the module docstring for the definitions)."""
    deliveries = [d for r in records for d in r.deliveries]
    span, tokens, tok_per_s = rate_in_window(deliveries, window)
    # Request rate from the token rate: in a closed loop the users' requests start and finish in waves for a while
    # (all start at once), which a window of completions sees as bursts; the token stream does not.
    done = [r.completion_tokens for r in records if r.completed and r.completion_tokens]
    req_per_s = tok_per_s / statistics.mean(done) if done else 0.0
    started = [r for r in records if window[0] <= r.start <= window[1]]
    completed = [r for r in started if r.completed]
    censored = [r for r in started if r.end is None and r.error is None]
    failed = [r for r in started if r.error is not None]
    latencies = [r.latency for r in completed] + [math.inf] * len(censored)
    ttfts = [r.ttft for r in started if r.ttft is not None] + [math.inf for r in censored if r.ttft is None]
    measured_mean = sum(r.latency for r in completed) / len(completed) if completed else math.nan
    littles_law = users / req_per_s if req_per_s > 0 else math.inf
    return {
        "users": users,
        "window_start_s": window[0],
        "requests_started": len(started),
        "requests_completed": len(completed),
        "requests_censored": len(censored),
        "requests_failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "elapsed_s": span,
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in completed),
        "tok_per_s": tok_per_s,
        "req_per_s": req_per_s,
        "latency_mean_s": measured_mean if not censored else littles_law,
        "latency_mean_estimated": bool(censored),
        "latency_mean_measured_s": measured_mean,
        "latency_littles_law_s": littles_law,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p99_s": percentile(latencies, 0.99),
        "ttft_p50_s": percentile(ttfts, 0.50),
        "ttft_p99_s": percentile(ttfts, 0.99),
    }


async def run_level(url: str, requests: Iterator[RequestSpec], users: int, duration_s: float, drain_s: float,
                    progress: tqdm | None = None, timeout_s: float = 3600.0, batch_grace_s: float | None = None,
                    warmup_s: float = 0.0, warmup_completions: int | None = None) -> LevelResult:  # fmt: skip
    """`users` concurrent closed-loop users: a warm-up of up to `warmup_s` (ended early once `warmup_completions`
    requests have completed), the measured `duration_s`, then up to `drain_s` for the requests in flight.

    `batch_grace_s`: for servers that work through a queue one request or batch at a time, end the drain this long
    after the first request completes in it (the request or batch that was being served), rather than waiting
    `drain_s` for a queue that cannot empty.
    """
    records: list[RequestRecord] = []
    started_at = time.time()
    t0 = time.perf_counter()
    stop_at = [math.inf]  # users start no request after this (seconds since t0); set when the window ends
    drained_at: list[float] = []  # when the first request completed after `stop_at`
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        async def user() -> None:
            while time.perf_counter() - t0 < stop_at[0]:
                spec = next(requests)
                record = RequestRecord(start=time.perf_counter() - t0, prompt_tokens=spec.prompt_tokens)
                records.append(record)
                try:
                    await send(client, url, spec, record, t0)
                except httpx.HTTPError as error:
                    record.error = f"{type(error).__name__}: {error}"
                if progress is not None:
                    progress.update()
                if record.completed and record.end >= stop_at[0] and not drained_at:
                    drained_at.append(record.end)
                if record.error is not None:
                    await asyncio.sleep(0.5)  # a refusing server must not spin the loop

        tasks = [asyncio.create_task(user()) for _ in range(users)]
        while True:
            now = time.perf_counter() - t0
            num_completed = sum(1 for r in records if r.completed)
            if now >= warmup_s or (warmup_completions is not None and num_completed >= warmup_completions):
                break
            await asyncio.sleep(0.05)
        measured_from = time.perf_counter() - t0
        if progress is not None:
            progress.set_postfix_str(f"warm-up done at {measured_from:.0f} s")
        await asyncio.sleep(duration_s)
        # A server answering in bursts further apart than the window (a static batch on a slow moment): keep the
        # window open until its next answer, at most `drain_s` longer, so that it holds at least one.
        while (not any(t > measured_from for r in records for t, _ in r.deliveries)
               and time.perf_counter() - t0 < measured_from + duration_s + drain_s):  # fmt: skip
            await asyncio.sleep(0.05)
        stop_at[0] = time.perf_counter() - t0
        deadline = stop_at[0] + drain_s
        while not all(task.done() for task in tasks):
            now = time.perf_counter() - t0
            if batch_grace_s is not None and drained_at:
                deadline = min(deadline, drained_at[0] + batch_grace_s)
            if now >= deadline:
                break
            await asyncio.sleep(0.05)
        ended_s = time.perf_counter() - t0
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
    return LevelResult(users, stop_at[0] - measured_from, drain_s, records, started_at, measured_from, ended_s)


def request_cycle(workload: Sequence[RequestSpec]) -> Iterator[RequestSpec]:
    return itertools.cycle(workload)


def main() -> None:
    from transformers import AutoTokenizer

    from replicas.default_model import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/generate")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of unmeasured load first (at most)")
    parser.add_argument("--workload", choices=("mixed", "shared_prefix", "parallel_sampling"), default="mixed")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="tokenizer for building prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    words = word_vocabulary(AutoTokenizer.from_pretrained(str(args.model)))
    build = {"mixed": mixed_workload, "shared_prefix": shared_prefix_workload,
             "parallel_sampling": parallel_sampling_workload}[args.workload]  # fmt: skip
    workload = build(words, 256, args.seed)
    with tqdm(desc=f"{args.users} users", unit="req") as progress:
        result = asyncio.run(run_level(args.url, request_cycle(workload), args.users, args.duration, args.drain,
                                       progress, warmup_s=args.warmup, warmup_completions=args.users))  # fmt: skip
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
