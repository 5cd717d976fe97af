"""The engine for servers: its step loop runs in one background thread; callers await output deltas."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from replicas.config import EngineConfig
from replicas.contract import ModelInfo
from replicas.engine import LLMEngine, OutputKind
from replicas.outputs import EngineStats, RequestOutput
from replicas.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's step loop has stopped; the replica must be restarted."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int] | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    output_kind: OutputKind
    priority: int
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    accepted: "asyncio.Future[None]"


class AsyncEngine:
    """Owns an `LLMEngine` and the only thread that touches it.

    Callers talk to that thread through a command queue; each request's outputs come back on its own asyncio
    queue. Cancelling the consumer of `generate` aborts the request, which frees its KV blocks.
    """

    def __init__(self, config: EngineConfig | LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = config if isinstance(config, LLMEngine) else LLMEngine(config)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._idle_wait_s = idle_wait_s
        self._stats = self.engine.stats()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # --- caller side (any thread with an event loop) ----------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (cheap; never waits for the engine thread)."""
        return self._stats

    @property
    def heartbeat(self) -> float:
        """Monotonic time of the engine loop's last sign of life (a finished step, or an idle wait)."""
        return self.last_step_time

    def model_info(self) -> ModelInfo:
        engine, config = self.engine, self.engine.config
        return ModelInfo(
            model=engine.model_name,
            max_model_len=engine.max_model_len,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            num_total_blocks=engine.block_manager.num_total_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
        )

    def recent_prefix_hashes(self, limit: int) -> list[bytes]:
        """The `limit` most recently registered prefix-cache block hashes, most recent last."""
        cached = self.engine.block_manager.cached_block_ids
        # NOTE: the engine thread mutates this dict; copying its keys is one C call under the GIL, and the retry
        # covers a resize caught mid-copy. A slightly stale view is fine: routing only needs a good guess.
        for _ in range(3):
            try:
                return list(cached)[-limit:] if limit > 0 else []
            except RuntimeError:
                continue
        return []

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        output_kind: OutputKind = "delta",
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; raises `RequestError` for a refused request."""
        if not self.is_alive:
            raise EngineDeadError(f"engine loop is not running: {self._error!r}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future[None] = loop.create_future()
        self._commands.put(
            _Add(
                request_id, prompt, prompt_token_ids, params or SamplingParams(), output_kind, priority, loop, outputs,
                accepted,
            )
        )
        finished = False
        try:
            await accepted
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (disconnect, cancel) or the request failed
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout_s)

    # --- engine thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    continue
                outputs = self.engine.step()
                self.last_step_time = time.monotonic()
                self._stats = self.engine.stats()
                for output in outputs:
                    self._deliver(output.request_id, output, done=output.finished)
        except BaseException as error:  # noqa: BLE001 — reported to every waiting caller and the health check
            logger.exception("engine loop died")
            self._error = error
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop died: {error!r}"), done=True)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            self.last_step_time = time.monotonic()  # idle is healthy
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: object) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(
                    command.request_id,
                    command.prompt,
                    command.params,
                    prompt_token_ids=command.prompt_token_ids,
                    output_kind=command.output_kind,
                    priority=command.priority,
                )
            except Exception as error:  # noqa: BLE001 — a refused request goes back to its caller
                command.loop.call_soon_threadsafe(_set_future, command.accepted, error)
                return
            self._streams[command.request_id] = (command.loop, command.outputs)
            command.loop.call_soon_threadsafe(_set_future, command.accepted, None)
            self._stats = self.engine.stats()
        elif isinstance(command, tuple) and command[0] == "abort":
            request_id = command[1]
            if self.engine.abort(request_id):
                self._stats = self.engine.stats()
            self._streams.pop(request_id, None)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, done: bool) -> None:
        stream = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self.engine.abort(request_id)


def _set_future(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
