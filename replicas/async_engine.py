"""The engine for servers: its step loop runs in one background thread; callers await output deltas."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from replicas import kv_transfer
from replicas.config import EngineConfig
from replicas.contract import ModelInfo, RequestOutput, ResumeState, merge_deltas
from replicas.engine import LLMEngine
from replicas.intake import OutputKind
from replicas.kv_transfer import PrefixKV
from replicas.outputs import EngineStats
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
    accepted: asyncio.Future[None]
    resume: ResumeState | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Import:
    token_ids: list[int]
    prefix: PrefixKV


_WAKE = object()


class AsyncEngine:
    """Owns an `LLMEngine` and the only thread that touches it.

    Callers talk to that thread through a command queue; each request's outputs come back on its own asyncio
    queue, all of a step's outputs for one event loop in one callback. Cancelling the consumer of `generate`
    aborts the request, which frees its KV blocks.
    """

    def __init__(self, config: EngineConfig | LLMEngine, idle_wait_s: float = 0.05) -> None:
        """Given a config, the engine is built on the engine thread (see `_run`); returns once it is ready, or
        raises what building it raised."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._idle_wait_s = idle_wait_s
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        # Monotonic time of the loop's last sign of life (a step, or an idle wait): the health check reads it.
        self.heartbeat = time.monotonic()
        built: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(config, built), name="engine-loop", daemon=True)
        self._thread.start()
        engine = built.get()
        if not isinstance(engine, LLMEngine):
            self._thread.join()
            raise engine
        self._model_info = engine.model_info()
        self._stats = engine.stats()

    # --- caller side (any thread with an event loop) ----------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (cheap; never waits for the engine thread)."""
        return self._stats

    def model_info(self) -> ModelInfo:
        return self._model_info

    def recent_prefix_hashes(self, limit: int) -> list[bytes]:
        """The most recently registered prefix-cache block hashes, oldest first (any thread)."""
        return self.engine.block_manager.prefix_cache.recent_hashes(limit)

    def export_prefix(self, token_ids: list[int], start_block: int, max_blocks: int) -> PrefixKV | None:
        """`kv_transfer.export_prefix`, from any thread (it never waits for the engine thread)."""
        return kv_transfer.export_prefix(self.engine, token_ids, start_block, max_blocks)

    def cached_prefix_blocks(self, token_ids: list[int], max_blocks: int) -> int:
        """How many of `token_ids`' leading full blocks (at most `max_blocks`) the prefix cache holds (any thread)."""
        return len(self.engine.block_manager.prefix_cache.cached_run(token_ids, max_blocks))

    def import_prefix(self, token_ids: list[int], prefix: PrefixKV) -> None:
        """Queue `kv_transfer.import_prefix`: it runs before any request queued after this call is added."""
        self._commands.put(_Import(token_ids, prefix))

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        output_kind: OutputKind = "delta",
        priority: int = 0,
        resume: ResumeState | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; raises `RequestError` for a refused request."""
        if not self.is_alive:
            raise EngineDeadError(f"engine loop is not running: {self._error!r}")
        params = params or SamplingParams()
        if params.structured_output is not None:
            # Compiled here, off the engine thread, before the request is queued: a spec that does not compile is
            # refused (RequestError) like any bad request; the engine then finds it in the cache.
            await asyncio.wrap_future(self.engine.structured_output.compile(params.structured_output))
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future[None] = loop.create_future()
        command = _Add(request_id, prompt, prompt_token_ids, params, output_kind, priority, loop,
                       outputs, accepted, resume)  # fmt: skip
        self._commands.put(command)
        if not self.is_alive:  # it died after the check above: nobody may ever read the command
            self._refuse(command)
        finished = False
        try:
            await accepted
            while True:
                item = await outputs.get()
                if output_kind == "delta":
                    # NOTE: a consumer that fell behind gets what piled up as one output: one message for the
                    # replica to send however many steps it missed, not one per step.
                    while not isinstance(item, BaseException) and not item.finished and not outputs.empty():
                        later = outputs.get_nowait()
                        item = later if isinstance(later, BaseException) else merge_deltas(item, later)
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
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(_WAKE)
        self._thread.join(timeout_s)

    # --- engine thread ----------------------------------------------------------------------------------------

    def _run(self, config: EngineConfig | LLMEngine, built: queue.SimpleQueue) -> None:
        try:
            # NOTE: built here, the engine's load, warm-up and steps start every OpenMP region from this one thread.
            # libgomp keeps a worker pool per thread that starts regions; once pooled threads outnumber the CPUs it
            # cuts its workers' spin-wait to a few iterations, and each region (hundreds per step) then waits ~0.1
            # ms for a sleeping worker: built on the caller's thread, one served stream ran 1.56x slower than
            # offline on 2 vCPUs (README, "The serving path").
            engine = config if isinstance(config, LLMEngine) else LLMEngine(config)
        except BaseException as error:  # noqa: BLE001 — raised in the caller's thread
            built.put(error)
            return
        self.engine = engine
        built.put(engine)
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    continue
                outputs = self.engine.step()
                self.heartbeat = time.monotonic()
                self._stats = self.engine.stats()
                self._deliver(outputs)
        except BaseException as error:  # noqa: BLE001 — reported to every waiting caller and the health check
            logger.exception("engine loop died")
            self._error = error
            dead = EngineDeadError(f"engine loop died: {error!r}")
            for request_id in list(self._streams):
                self._send({request_id: dead})
            self._refuse_queued()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            self.heartbeat = time.monotonic()  # idle is healthy
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
                self.engine.add_request(command.request_id, command.prompt, command.params,
                                        prompt_token_ids=command.prompt_token_ids, output_kind=command.output_kind,
                                        priority=command.priority, resume=command.resume)  # fmt: skip
            except Exception as error:  # noqa: BLE001 — a refused request goes back to its caller
                command.loop.call_soon_threadsafe(_set_future, command.accepted, error)
                return
            self._streams[command.request_id] = (command.loop, command.outputs)
            command.loop.call_soon_threadsafe(_set_future, command.accepted, None)
            self._stats = self.engine.stats()
        elif isinstance(command, _Abort):
            if self.engine.abort(command.request_id):
                self._stats = self.engine.stats()
            self._streams.pop(command.request_id, None)
        elif isinstance(command, _Import):
            try:
                kv_transfer.import_prefix(self.engine, command.token_ids, command.prefix)
            except ValueError as error:  # a peer with another cache layout: its request computes the prefix
                logger.warning("kv transfer: could not import a prefix: %s", error)
            self._stats = self.engine.stats()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self._send({output.request_id: output for output in outputs})

    def _send(self, items: dict[str, RequestOutput | BaseException]) -> None:
        """Hand each item to its request's queue: one thread-safe callback per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items.items():
            done = isinstance(item, BaseException) or item.finished
            stream = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for outputs, item in batch:
                    if isinstance(item, RequestOutput) and not item.finished:
                        self.engine.abort(item.request_id)

    def _refuse_queued(self) -> None:
        """Answer requests still in the command queue of a dead loop: they would otherwise wait forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._refuse(command)

    def _refuse(self, command: _Add) -> None:
        error = EngineDeadError(f"engine loop is not running: {self._error!r}")
        try:
            command.loop.call_soon_threadsafe(_set_future, command.accepted, error)
        except RuntimeError:
            pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)


def _set_future(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
