"""Moving a cached prompt prefix's K/V from one replica to another, so that a request sent away from the replica
holding its prefix (busy) does not prefill it again.

The request router knows which replica holds how much of a request's prefix; when it sends the request elsewhere
it passes the holder's `KVTransferServer` address along (`kv_source`). The receiving replica then asks the holder
for the blocks it lacks (`fetch_prefix`), caches them (`import_prefix`) and only then queues the request,
whose admission finds them like any prefix-cache hit. The holder answers from its serving thread without waiting
for its engine: blocks are copied out of the cache as they are, and any that were evicted during the copy are cut
off (`PrefixCache.still_held`).

Wire format, one request per connection: the client sends a JSON line `{"token_ids": [...], "start_block": i,
"max_blocks": n}`; the server answers a JSON line `{"num_blocks": m, "shape": [...], "dtype": "bfloat16"}` (m may
be 0) followed by the keys' then the values' raw bytes, `[layers, m, block_size, kv_heads, head_dim]` each.
Bound to 127.0.0.1: replicas on one node exchange prefixes; elsewhere the fetch fails and the prefix is computed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from replicas.engine import LLMEngine

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a JSON line of token ids (~100K tokens)
_READ_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PrefixKV:
    """K/V of a prompt's full blocks `start_block .. start_block + num_blocks - 1`, every layer."""

    start_block: int
    keys: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    values: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[1]


def export_prefix(engine: LLMEngine, token_ids: list[int], start_block: int, max_blocks: int) -> PrefixKV | None:
    """Copies of the K/V of `token_ids`' cached leading full blocks from `start_block` on (at most `max_blocks`
    blocks in all), for another engine's `import_prefix`; None when none of those is cached. Safe from any
    thread: blocks evicted while they were copied are cut off."""
    run = engine.block_manager.prefix_cache.cached_run(token_ids, max_blocks)
    if len(run) <= start_block:
        return None
    keys, values = engine.model_runner.read_blocks([block_id for block_id, _ in run[start_block:]])
    num_valid = engine.block_manager.prefix_cache.still_held(run) - start_block
    if num_valid <= 0:
        return None
    return PrefixKV(start_block, keys[:, :num_valid], values[:, :num_valid])


def import_prefix(engine: LLMEngine, token_ids: list[int], prefix: PrefixKV) -> int:
    """Cache another engine's K/V of `token_ids`' full blocks (see `BlockManager.import_blocks`): a request with
    this prefix then finds them like any prefix-cache hit. Engine thread only. Returns how many blocks were taken."""
    engine.model_runner.check_block_kv(prefix.keys, prefix.values)  # before any block changes hands
    block_ids = engine.block_manager.import_blocks(token_ids, prefix.start_block, prefix.num_blocks)
    if block_ids:
        count = len(block_ids)
        engine.model_runner.write_blocks(block_ids, prefix.keys[:, :count], prefix.values[:, :count])
    return len(block_ids)


ExportPrefix = Callable[[list[int], int, int], "PrefixKV | None"]  # (token_ids, start_block, max_blocks)


class KVTransferServer:
    """Serves `export` (an engine's `export_prefix`) to other replicas over TCP on 127.0.0.1, from a thread of its
    own."""

    def __init__(self, export: ExportPrefix, host: str = "127.0.0.1", port: int = 0) -> None:
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                # A small header then the payload: without this, Nagle holds the payload for the client's delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                server._answer(self.rfile, self.wfile)

        self._export = export
        self._server = socketserver.ThreadingTCPServer((host, port), Handler, bind_and_activate=True)
        self._server.daemon_threads = True
        self.address = "%s:%d" % self._server.server_address[:2]
        self.num_exported_blocks = 0
        self._thread = threading.Thread(target=self._server.serve_forever, name="kv-transfer", daemon=True)
        self._thread.start()

    def _answer(self, reader: Any, writer: Any) -> None:
        try:
            request = json.loads(reader.readline(_MAX_REQUEST_BYTES))
            token_ids = [int(token) for token in request["token_ids"]]
            prefix = self._export(token_ids, int(request["start_block"]), int(request["max_blocks"]))
        except Exception as error:  # noqa: BLE001 — a bad request only ends its connection
            logger.warning("kv transfer: refused a request: %s", error)
            return
        if prefix is None:
            writer.write(b'{"num_blocks": 0}\n')
            return
        keys, values = prefix.keys.contiguous(), prefix.values.contiguous()
        header = {"num_blocks": prefix.num_blocks, "shape": list(keys.shape),
                  "dtype": str(keys.dtype).removeprefix("torch.")}  # fmt: skip
        writer.write(json.dumps(header).encode() + b"\n")
        writer.write(_raw_bytes(keys))
        writer.write(_raw_bytes(values))
        self.num_exported_blocks += prefix.num_blocks

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def fetch_prefix(address: str, token_ids: list[int], start_block: int, max_blocks: int,
                       timeout_s: float) -> PrefixKV | None:  # fmt: skip
    """The K/V of `token_ids`' full blocks from `start_block` on (at most `max_blocks` in all) that the replica
    serving at `address` holds; None when it holds none of them, or does not answer within `timeout_s`."""
    host, port = address.rsplit(":", 1)
    try:
        return await asyncio.wait_for(_fetch(host, int(port), token_ids, start_block, max_blocks), timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError, KeyError) as error:
        logger.info("kv transfer from %s failed (%s): computing the prefix instead", address, error or "timeout")
        return None


async def _fetch(host: str, port: int, token_ids: list[int], start_block: int, max_blocks: int) -> PrefixKV | None:
    # A buffer bound past the payload: under it, the reader pauses and resumes the socket every few MB (3x slower).
    reader, writer = await asyncio.open_connection(host, port, limit=_READ_BUFFER_BYTES)
    try:
        request = {"token_ids": token_ids, "start_block": start_block, "max_blocks": max_blocks}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        header = json.loads(await reader.readline())
        if not header.get("num_blocks"):
            return None
        shape, dtype = [int(size) for size in header["shape"]], _DTYPES[header["dtype"]]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        keys = _tensor(await reader.readexactly(nbytes), shape, dtype)
        values = _tensor(await reader.readexactly(nbytes), shape, dtype)
        return PrefixKV(start_block, keys, values)
    finally:
        writer.close()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _tensor(data: bytes, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def free_port_address() -> str:
    """An address on 127.0.0.1 nothing listens on (for tests of a failed fetch)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % probe.getsockname()[1]
