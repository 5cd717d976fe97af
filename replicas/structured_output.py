"""Structured outputs: grammars compiled off the engine thread, cached by spec; per-sequence matchers; token masks."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from replicas.intake import RequestError
from replicas.sampling_params import StructuredOutputParams

logger = logging.getLogger(__name__)


class StructuredOutputError(RequestError):
    """A structured-output spec the engine refuses: too large, or it does not compile (the message says why)."""


class GrammarState:
    """One sequence's place in its grammar: the matcher (None while the grammar compiles) and the bitmask of the
    tokens allowed next, recomputed after each accepted token."""

    def __init__(self, compiling: Future, param: str) -> None:
        self.compiling: Future | None = compiling
        self.param = param  # the request field that asked for it, for error messages
        self.matcher: Any = None
        self.bitmask: torch.Tensor | None = None  # int32 [1, ceil(vocab / 32)], bit set: token allowed
        self.dead = False  # no token of the vocabulary can follow: the grammar cannot be completed from here

    @property
    def ready(self) -> bool:
        return self.matcher is not None

    def start(self, compiled: Any, stop_token_ids: list[int], vocab_size: int) -> str | None:
        """Make the matcher once the grammar is compiled. Returns an error message for a grammar that allows nothing."""
        import xgrammar

        self.compiling = None
        self.matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        return self._fill_mask()

    def accept(self, token_id: int) -> str | None:
        """Advance by a sampled token. Returns an error message when the grammar refuses it or is left with no
        allowed token (a dead state: the request must end, not hang)."""
        if not self.matcher.accept_token(token_id):
            return f"{self.param}: the grammar refused token {token_id} (sampled outside the mask)"
        return None if self.matcher.is_terminated() else self._fill_mask()

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def fork(self) -> GrammarState:
        """An independent copy for another sample of the request (the same tokens accepted so far)."""
        child = GrammarState(self.compiling, self.param)
        if self.matcher is not None:
            child.matcher = self.matcher.fork()
            child.bitmask = self.bitmask.clone()
        return child

    def _fill_mask(self) -> str | None:
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        if not bool(self.bitmask.any()):
            self.dead = True
            return f"{self.param}: the grammar allows no next token (dead state); check the schema or grammar"
        return None


class StructuredOutputManager:
    """Compiles grammars on a small thread pool, caches them (and their errors) by (kind, spec), and applies the
    masks of constrained rows to a step's logits. `compile` is thread-safe: the asyncio side of `AsyncEngine`
    awaits it before queueing a request, so a spec that does not compile is refused with a 400."""

    def __init__(
        self, tokenizer: object, vocab_size: int, stop_token_ids: list[int], *, max_spec_bytes: int,
        num_threads: int, cache_size: int,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_spec_bytes = max_spec_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grammar-compile")
        self._compiler: Any = None  # made on first use: reading the vocabulary takes a while

    def compile(self, spec: StructuredOutputParams) -> Future:
        """The compiled grammar for `spec`, as a future (done at once on a cache hit). Raises
        `StructuredOutputError` at once for a spec over the size limit."""
        kind, text = spec.key()
        if len(text.encode()) > self.max_spec_bytes:
            raise StructuredOutputError(
                f"{spec.param}: the {kind} is {len(text.encode())} bytes; this server accepts at most "
                f"{self.max_spec_bytes}", param=spec.param,
            )  # fmt: skip
        with self._lock:
            future = self._cache.get((kind, text))
            if future is not None:
                self._cache.move_to_end((kind, text))
                return future
            future = self._pool.submit(self._compile, kind, text, spec.param)
            self._cache[(kind, text)] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def state_for(self, spec: StructuredOutputParams) -> GrammarState:
        return GrammarState(self.compile(spec), spec.param)

    def start(self, state: GrammarState) -> str | None:
        """Turn a compiled grammar into the sequence's matcher. Returns an error message (compile error or dead
        start); call only when `state.compiling.done()`."""
        error = state.compiling.exception()
        if error is not None:
            return str(error)
        return state.start(state.compiling.result(), self.stop_token_ids, self.vocab_size)

    @staticmethod
    def wait_any(states: list[GrammarState], timeout_s: float) -> None:
        """Block until one of the grammars is compiled or `timeout_s` passes (the engine has nothing else to do)."""
        wait([s.compiling for s in states if s.compiling is not None], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def _compile(self, kind: str, text: str, param: str) -> Any:
        try:
            compiled = self._compile_spec(kind, text)
        except Exception as error:  # noqa: BLE001 — the library's errors (RuntimeError, ValueError, ...) vary
            lines = str(error).strip().splitlines() or [type(error).__name__]
            message = re.sub(r"^\[[\d:]+\] \S+: ", "", lines[-1])  # xgrammar's "[time] file.cc:line: " prefix
            raise StructuredOutputError(f"{param}: the {kind} does not compile: {message}", param=param) from error
        # A grammar that compiles but allows no token of this vocabulary at its start (say, a regex of characters no
        # token spells) could only end the request as an engine error: refuse it here, once per spec, as a bad spec.
        if GrammarState(Future(), param).start(compiled, self.stop_token_ids, self.vocab_size) is not None:
            raise StructuredOutputError(
                f"{param}: the {kind} allows no token of this model's vocabulary at its start", param=param
            )
        return compiled

    def _compile_spec(self, kind: str, text: str) -> Any:
        compiler = self._get_compiler()
        if kind == "json":
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(json.loads(text)))
        return compiler.compile_grammar(text)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def apply_token_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: list[torch.Tensor]) -> None:
    """Set to -inf, in place, the logits of tokens the grammar of each constrained row does not allow; other rows
    are untouched."""
    import xgrammar

    width = bitmasks[0].shape[1]
    batch = torch.full((logits.shape[0], width), -1, dtype=torch.int32)  # -1: every bit set, all allowed
    batch[rows] = torch.cat(bitmasks)
    xgrammar.apply_token_bitmask_inplace(logits, batch.to(logits.device, non_blocking=True), indices=rows)
