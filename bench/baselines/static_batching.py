"""The seed's static batching server: collect up to 8 requests for at most 100 ms, pad them into one batch, and
generate until the longest is done; every request in the batch finishes together.

    python -m bench.baselines.static_batching [--model DIR] [--port 8002] [--batch-size 8] [--timeout-ms 100]

Same `POST /generate` shape as the ingress (see bench/baselines/common.py). A batch holds requests with the same
sampling mode (`temperature`, `ignore_eos`); a request with `n > 1` takes `n` rows of it. Prompts are left-padded
to the longest; the batch decodes for the largest `max_tokens` in it and each request keeps its own share. With
`"stream": true` the answer still comes at once when the batch ends. `GET /stats` reports the KV memory
efficiency of the padded batches (useful token slots / slots the batch's cache held); `POST /reset` drops
everything queued or running (the benchmark calls it between load levels).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flask import Flask, Response, jsonify, request
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from bench.baselines.common import (
    Cancelled,
    GenerateBody,
    ResetEpoch,
    error_response,
    json_answer,
    parse_body,
    set_threads,
    sse,
)
from bench.baselines.naive_flask import StopOnReset

logger = logging.getLogger(__name__)


@dataclass
class Pending:
    body: GenerateBody
    prompt_ids: list[int]
    epoch: int
    done: threading.Event = field(default_factory=threading.Event)
    texts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    error: BaseException | None = None

    @property
    def mode(self) -> tuple[float, bool]:
        """Requests batch together only when they sample the same way."""
        return (self.body.temperature or 0.0, self.body.ignore_eos)


@dataclass
class BatchStats:
    num_batches: int = 0
    num_requests: int = 0
    live_slots: int = 0  # prompt + kept generated tokens of each row
    allocated_slots: int = 0  # rows x (padded prompt + decoded steps): what the batch's KV cache held

    def as_dict(self) -> dict[str, float]:
        return {
            "num_batches": self.num_batches,
            "mean_batch_size": self.num_requests / self.num_batches if self.num_batches else 0.0,
            "kv_memory_efficiency": self.live_slots / self.allocated_slots if self.allocated_slots else 1.0,
            "live_slots": self.live_slots,
            "allocated_slots": self.allocated_slots,
        }


class StaticBatcher:
    """One thread forms batches from a queue and runs them, one batch at a time."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, timeout_s: float = 0.1) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.epoch = ResetEpoch()
        self.stats = BatchStats()
        self._queue: collections.deque[Pending] = collections.deque()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="static-batcher", daemon=True)
        self._thread.start()

    def submit(self, body: GenerateBody) -> Pending:
        pending = Pending(body, self.tokenizer(body.prompt).input_ids, self.epoch.value)
        with self._ready:
            self._queue.append(pending)
            self._ready.notify()
        return pending

    def reset(self) -> int:
        epoch = self.epoch.bump()
        with self._ready:
            dropped, self._queue = list(self._queue), collections.deque()
            self._ready.notify_all()  # a batch being collected ends now, and fails as cancelled
        for pending in dropped:
            pending.error = Cancelled()
            pending.done.set()
        return epoch

    # --- the batching thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            try:
                self._run(batch)
            except BaseException as error:  # noqa: BLE001 — fail this batch's requests, keep serving
                logger.exception("batch failed")
                for pending in batch:
                    pending.error = error
            for pending in batch:
                pending.done.set()

    def _collect(self) -> list[Pending]:
        """The first waiting request, then same-mode requests arriving within `timeout_s` of it, up to the size."""
        with self._ready:
            while not self._queue:
                self._ready.wait()
            first = self._queue.popleft()
            batch, skipped = [first], []
            deadline = time.monotonic() + self.timeout_s
            while len(batch) < self.batch_size and self.epoch.value == first.epoch:
                if not self._queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._ready.wait(remaining):
                        break
                    continue
                pending = self._queue.popleft()
                (batch if pending.mode == first.mode else skipped).append(pending)
            self._queue.extendleft(reversed(skipped))  # other modes keep their place at the front
        return batch

    def _run(self, batch: list[Pending]) -> None:
        admitted = batch[0].epoch
        if any(p.epoch != self.epoch.value for p in batch):
            raise Cancelled
        rows = [p for p in batch for _ in range(p.body.n)]
        width = max(len(p.prompt_ids) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros_like(input_ids)
        for row, pending in enumerate(rows):
            input_ids[row, width - len(pending.prompt_ids) :] = torch.tensor(pending.prompt_ids)
            attention_mask[row, width - len(pending.prompt_ids) :] = 1
        first = batch[0].body
        longest = max(p.body.num_tokens for p in batch)
        kwargs: dict[str, Any] = {"max_new_tokens": longest, "do_sample": first.do_sample,
                                  "pad_token_id": self.pad_token_id,
                                  "stopping_criteria": StoppingCriteriaList([StopOnReset(self.epoch, admitted)])}  # fmt: skip
        if first.do_sample:
            kwargs["temperature"] = first.temperature
        if first.ignore_eos:
            kwargs["min_new_tokens"] = longest
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.inference_mode():
            output = self.model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        if self.epoch.value != admitted:
            raise Cancelled
        generated = output[:, width:].tolist()
        steps = len(generated[0]) if generated else 0
        live = 0
        for row, pending in enumerate(rows):
            tokens = generated[row][: pending.body.num_tokens]
            if not pending.body.ignore_eos and self.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.eos_token_id)]
            pending.texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            pending.completion_tokens += len(tokens)
            live += len(pending.prompt_ids) + len(tokens)
        self.stats.num_batches += 1
        self.stats.num_requests += len(batch)
        self.stats.live_slots += live
        self.stats.allocated_slots += len(rows) * (width + steps)


def create_app(model_dir: str | Path, batch_size: int = 8, timeout_s: float = 0.1) -> Flask:
    app = Flask(__name__)
    batcher = StaticBatcher(model_dir, batch_size, timeout_s)
    app.config["batcher"] = batcher

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> Any:
        return {"pid": os.getpid(), **batcher.stats.as_dict()}

    @app.post("/reset")
    def reset() -> Any:
        return {"epoch": batcher.reset()}

    @app.post("/generate")
    def generate() -> Any:
        body = parse_body(request.get_json(silent=True))
        if isinstance(body, Response):
            return body
        pending = batcher.submit(body)
        pending.done.wait()
        if isinstance(pending.error, Cancelled):
            return error_response(503, "the server was reset while this request waited", code="reset")
        if pending.error is not None:
            return error_response(500, f"generation failed: {pending.error}", code="internal_error")
        answer = json_answer(pending.texts, len(pending.prompt_ids), pending.completion_tokens)
        if body.stream:  # all requests of a batch finish together: the whole answer is one event
            per_text = pending.completion_tokens // len(pending.texts)
            events = [sse({"index": i, "text": text, "num_tokens": per_text}) for i, text in enumerate(pending.texts)]
            return Response("".join(events) + sse({"usage": answer["usage"]}) + sse("[DONE]"),
                            mimetype="text/event-stream")  # fmt: skip
        return jsonify(answer)

    return app


def main() -> None:
    from replicas.default_model import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout-ms", type=float, default=100.0, help="how long a batch waits to fill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs given)")
    args = parser.parse_args()
    set_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(args.model, args.batch_size, args.timeout_ms / 1000)
    print(f"static batching server ready on http://{args.host}:{args.port}", flush=True)
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
