"""The seed's naive server: Flask and a `transformers` text-generation pipeline, one request at a time.

    python -m bench.baselines.naive_flask [--model DIR] [--port 8001] [--threads 2]

`POST /generate` takes the ingress's request shape (see bench/baselines/common.py); requests wait for a global
lock, so the model serves exactly one at a time, however many clients are connected. With `"stream": true` and
`n == 1` tokens stream as they are generated (so time to first token is the queueing delay plus the prefill);
`n > 1` is one `num_return_sequences` call, answered at once. `POST /reset` drops everything queued or running
(the benchmark calls it between load levels); `GET /stats` reports the process id and what was served.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flask import Flask, Response, jsonify, request
from transformers import StoppingCriteria, StoppingCriteriaList, pipeline

from bench.baselines.common import (
    Cancelled,
    CountingStreamer,
    GenerateBody,
    ResetEpoch,
    error_response,
    json_answer,
    parse_body,
    set_threads,
    sse,
)

logger = logging.getLogger(__name__)


class StopOnReset(StoppingCriteria):
    """Ends a generation as soon as `/reset` moves the epoch past the one the request was admitted under."""

    def __init__(self, epoch: ResetEpoch, admitted: int) -> None:
        self.epoch, self.admitted = epoch, admitted

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.epoch.value != self.admitted, dtype=torch.bool)


class NaiveGenerator:
    """A pipeline behind a lock: one generation at a time, in arrival order of the lock (roughly FIFO)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.pipe = pipeline("text-generation", model=str(model_dir), dtype=torch.float32, device="cpu")
        self.tokenizer = self.pipe.tokenizer
        self.eos_token_id = self.tokenizer.eos_token_id
        self.lock = threading.Lock()
        self.epoch = ResetEpoch()
        self.num_served = 0
        self.num_generated_tokens = 0

    def generate(self, body: GenerateBody, admitted: int, streamer: CountingStreamer | None = None) -> list[str]:
        """Generate `body.n` texts; raises `Cancelled` after a reset."""
        with self.lock:
            if self.epoch.value != admitted:
                raise Cancelled
            kwargs: dict[str, Any] = {
                "max_new_tokens": body.num_tokens,
                "do_sample": body.do_sample,
                "num_return_sequences": body.n,
                "return_full_text": False,
                "pad_token_id": self.eos_token_id,
                "stopping_criteria": StoppingCriteriaList([StopOnReset(self.epoch, admitted)]),
            }
            if body.do_sample:
                kwargs["temperature"] = body.temperature
            if body.ignore_eos:
                kwargs["min_new_tokens"] = body.num_tokens
            if streamer is not None:
                kwargs["streamer"] = streamer
            if body.seed is not None:
                torch.manual_seed(body.seed)
            with torch.inference_mode():
                outputs = self.pipe(body.prompt, **kwargs)
            if self.epoch.value != admitted:
                raise Cancelled
            self.num_served += 1
            return [output["generated_text"] for output in outputs]

    def count_tokens(self, texts: list[str], body: GenerateBody) -> int:
        if body.ignore_eos:  # exactly max_tokens each: min_new_tokens == max_new_tokens
            return body.num_tokens * len(texts)
        return sum(len(self.tokenizer(text, add_special_tokens=False).input_ids) for text in texts)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)


def create_app(model_dir: str | Path) -> Flask:
    app = Flask(__name__)
    generator = NaiveGenerator(model_dir)
    app.config["generator"] = generator

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> Any:
        return {"pid": os.getpid(), "num_served": generator.num_served,
                "num_generated_tokens": generator.num_generated_tokens}  # fmt: skip

    @app.post("/reset")
    def reset() -> Any:
        return {"epoch": generator.epoch.bump()}

    @app.post("/generate")
    def generate() -> Any:
        body = parse_body(request.get_json(silent=True))
        if isinstance(body, Response):
            return body
        admitted = generator.epoch.value
        prompt_tokens = generator.prompt_tokens(body.prompt)
        if body.stream and body.n == 1:
            return Response(_stream(generator, body, admitted, prompt_tokens), mimetype="text/event-stream")
        try:
            texts = generator.generate(body, admitted)
        except Cancelled:
            return error_response(503, "the server was reset while this request waited", code="reset")
        completion_tokens = generator.count_tokens(texts, body)
        generator.num_generated_tokens += completion_tokens
        if body.stream:  # n > 1: the pipeline cannot stream a batch; everything arrives at the end
            events = [sse({"index": i, "text": text, "num_tokens": completion_tokens // len(texts)})
                      for i, text in enumerate(texts)]  # fmt: skip
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            return Response("".join(events) + sse({"usage": usage}) + sse("[DONE]"), mimetype="text/event-stream")
        return jsonify(json_answer(texts, prompt_tokens, completion_tokens))

    return app


def _stream(generator: NaiveGenerator, body: GenerateBody, admitted: int, prompt_tokens: int) -> Iterator[str]:
    """Generate on a worker thread; relay the streamer's pieces as SSE events."""
    streamer = CountingStreamer(generator.tokenizer)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generator.generate(body, admitted, streamer)
        except BaseException as error:  # noqa: BLE001 — reported to the client below
            failure.append(error)
        finally:
            streamer.close()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while (piece := streamer.pieces.get()) is not None:
        text, num_tokens = piece
        yield sse({"index": 0, "text": text, "num_tokens": num_tokens})
    worker.join()
    if failure:
        message = "the server was reset" if isinstance(failure[0], Cancelled) else f"generation failed: {failure[0]}"
        yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    else:
        generator.num_generated_tokens += streamer.num_tokens
        yield sse({"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": streamer.num_tokens}})
    yield sse("[DONE]")


def main() -> None:
    from replicas.default_model import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs given)")
    args = parser.parse_args()
    set_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(args.model)
    print(f"naive server ready on http://{args.host}:{args.port}", flush=True)
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
