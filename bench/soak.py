"""Soak: closed-loop mixed load for minutes against two engine replicas, one of them killed (SIGKILL) and restarted
by Serve every `--kill-every-min`, with clients that disconnect; checks the run against pass criteria.

    python -m bench.soak [--minutes 30] [--users 32] [--kill-every-min 10] [--model DIR]

It starts its own Ray head and `serve run` of deploy/config.yaml on 127.0.0.1 (bench/servers.py) with two engine
replicas. Each user sends one request after another: completions or chat, a short or a long prompt, streamed or
not, `n` 1–3, greedy or seeded sampling; `--disconnect-fraction` (10%) of them are abandoned by the client at a
random point (a stream dropped after a random number of events, or a non-streamed request's client timeout).
Every `--kill-every-min` the replica holding the most requests is SIGKILLed; Serve starts a replacement, and the
requests it held migrate to the other replica (router/migration.py).

Pass criteria (each printed PASS/FAIL; `Criteria` below is the one definition):
- failed requests: 0. A failure is any outcome the client did not choose: a status other than 200 — except 429, and
  503 `server_overloaded`, the documented overload answers (counted apart) — an SSE `error` event, a stream that
  ends without `[DONE]` or without a finish reason for every choice, a non-streamed body without `n` finished
  choices, a transport error, or a client timeout the client did not set on purpose.
- leaked KV blocks: 0 on every live replica, after the load stops and the replicas drain.
- replica RSS growth < 5%: per replica process, from its warm-up (`--warmup-minutes` after the load started for the
  first two, after its own start for a replacement) to its last sample (the end, or just before it was killed); a
  replica that lived less than its warm-up plus two samples is not measured (reported as such).
- metrics consistent: the ingress's `ray_paged_serve_router_requests_total` (Ray's Prometheus export) against the
  client's count of answered requests by endpoint and status: the server's surplus is at most the requests the
  client left before seeing a status (its own timeouts, transport errors: the server answered, or counted its 500
  for the cancel, after the client left), and its shortfall at most the streams the client dropped after their 200
  (observed: 2 of 34 dropped streams never counted in one 3-minute run; reported in the detail, under
  investigation).

Results: bench/results/soak.json and a markdown summary (printed, and bench/results/soak.md). SIGTERM or Ctrl-C
stops the run and the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from pydantic import BaseModel, Field

from bench.servers import wait_until

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORDS = ("the river city light north stone garden winter music paper engine market forest signal harbor "
         "silver orange window travel simple").split()  # fmt: skip
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
OVERLOAD = "overload"  # 429, or 503 server_overloaded: documented answers to overload, not failures


class SoakConfig(BaseModel):
    """One soak run's load, faults and measurement."""

    minutes: float = Field(default=30.0, gt=0)
    users: int = Field(default=32, ge=1, description="closed-loop clients")
    warmup_minutes: float = Field(default=5.0, ge=0, description="RSS growth is measured after this")
    kill_every_min: float = Field(default=10.0, ge=0, description="0: no kills")
    max_kills: int | None = Field(default=None, ge=0, description="None: every kill_every_min to the end")
    disconnect_fraction: float = Field(default=0.1, ge=0, le=1)
    long_prompt_fraction: float = Field(default=0.25, ge=0, le=1)
    long_prompt_words: tuple[int, int] = (200, 400)
    max_tokens: int = Field(default=64, ge=1, description="most tokens a request asks for")
    sample_s: float = Field(default=10.0, gt=0, description="RSS sample and progress line period")
    seed: int = 0
    restart_timeout_s: float = Field(default=600.0, gt=0, description="most seconds for Serve to replace a replica")
    drain_timeout_s: float = Field(default=300.0, gt=0)
    metrics_timeout_s: float = Field(default=120.0, gt=0, description="for the counters to catch up (export lag)")
    max_rss_growth: float = 0.05


# --- the client ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw."""

    outcomes: Counter = field(default_factory=Counter)  # ok, dropped, timed_out, overload, failed
    failures: Counter = field(default_factory=Counter)  # why, for the failed ones
    answered: Counter = field(default_factory=Counter)  # (endpoint, status) of every response that started
    unanswered: int = 0  # left before a status: own timeouts, transport errors
    examples: list[str] = field(default_factory=list)

    def fail(self, why: str, detail: str = "") -> None:
        self.outcomes["failed"] += 1
        self.failures[why] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{why}: {detail[:300]}")


class Clients:
    """Closed-loop users sending the soak's request mix."""

    def __init__(self, url: str, config: SoakConfig) -> None:
        self.url = url
        self.config = config
        self.rng = random.Random(config.seed)
        self.tally = Tally()

    def _prompt(self, long: bool) -> str:
        low, high = self.config.long_prompt_words if long else (4, 30)
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(low, high)))

    def _request(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        body: dict[str, Any] = {"max_tokens": rng.randint(1, self.config.max_tokens), "n": rng.choice([1, 1, 1, 2, 3])}
        if rng.random() < 0.5:
            body.update(temperature=0.0)
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        prompt = self._prompt(rng.random() < self.config.long_prompt_fraction)
        if rng.random() < 0.5:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        return "/v1/completions", {**body, "prompt": prompt}

    async def one(self, client: httpx.AsyncClient) -> None:
        """Send one request and tally how it ended."""
        rng, tally = self.rng, self.tally
        endpoint, body = self._request()
        disconnect = rng.random() < self.config.disconnect_fraction
        try:
            if rng.random() < 0.6:
                await self._stream(client, endpoint, body, rng.randint(1, 20) if disconnect else None)
            else:
                await self._whole(client, endpoint, body, rng.uniform(0.05, 2.0) if disconnect else None)
        except httpx.TimeoutException as error:
            tally.unanswered += 1
            tally.fail("client_timeout", repr(error))  # the 600 s safety timeout: a hang
        except httpx.TransportError as error:
            tally.unanswered += 1
            tally.fail("transport_error", repr(error))

    async def _whole(self, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any],
                     timeout_s: float | None) -> None:  # fmt: skip
        try:
            response = await client.post(endpoint, json=body, timeout=timeout_s or 600.0)
        except httpx.TimeoutException:
            if timeout_s is None:
                raise
            self.tally.unanswered += 1
            self.tally.outcomes["timed_out"] += 1
            return
        self.tally.answered[(endpoint, response.status_code)] += 1
        if response.status_code != 200:
            self._error_status(response.status_code, response.text)
            return
        choices = response.json().get("choices", [])
        complete = all(c["finish_reason"] for c in choices)
        if sorted(c["index"] for c in choices) != list(range(body["n"])) or not complete:
            self.tally.fail("incomplete_body", response.text)
            return
        self.tally.outcomes["ok"] += 1

    async def _stream(self, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any],
                      drop_after: int | None) -> None:  # fmt: skip
        body = {**body, "stream": True}
        async with client.stream("POST", endpoint, json=body, timeout=600.0) as response:
            self.tally.answered[(endpoint, response.status_code)] += 1
            if response.status_code != 200:
                self._error_status(response.status_code, (await response.aread()).decode(errors="replace"))
                return
            finished: set[int] = set()
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    if finished != set(range(body["n"])):
                        self.tally.fail("stream_without_finish", f"finished {sorted(finished)} of n={body['n']}")
                    else:
                        self.tally.outcomes["ok"] += 1
                    return
                event = json.loads(data)
                if "error" in event:
                    self.tally.fail(f"sse_error:{event['error'].get('code')}", data)
                    return
                finished.update(c["index"] for c in event.get("choices", []) if c.get("finish_reason"))
                events += 1
                if drop_after is not None and events >= drop_after:
                    self.tally.outcomes["dropped"] += 1
                    return  # leaving the block closes the connection mid-stream
            self.tally.fail("stream_without_done", f"after {events} events")

    def _error_status(self, status: int, text: str) -> None:
        code = None
        try:
            code = json.loads(text)["error"].get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        if status == 429 or (status == 503 and code == "server_overloaded"):
            self.tally.outcomes[OVERLOAD] += 1
        else:
            self.tally.fail(f"status_{status}:{code}", text)

    async def user(self, deadline: float) -> None:
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=self.url, limits=limits) as client:
            while time.monotonic() < deadline:
                await self.one(client)

    @property
    def sent(self) -> int:
        return sum(self.tally.outcomes.values())


# --- the replicas: listing, killing, RSS -----------------------------------------------------------------------


def live_replicas(app: str) -> dict[str, dict[str, Any]]:
    """Routing stats of each live `LLMReplica` of `app`, by actor name (a dead or starting one is skipped)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#LLMReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]  # fmt: skip
    refs = {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace="serve").record_routing_stats.remote()
        except Exception:  # noqa: BLE001 — gone between listing and lookup
            continue
    stats = {}
    for name, ref in refs.items():
        try:
            stats[name] = ray.get(ref, timeout=15)
        except Exception:  # noqa: BLE001 — dead or not started yet
            continue
    return stats


@dataclass
class ReplicaLife:
    """One replica process over the run: RSS samples from `born_s` (seconds into the load) to `died_s`."""

    pid: int
    born_s: float
    died_s: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)

    def growth(self, warmup_s: float) -> float | None:
        """RSS growth from the first sample after its warm-up to its last one; None when too short to tell."""
        measured = [(t, rss) for t, rss in self.rss if t >= self.born_s + warmup_s]
        if len(measured) < 2:
            return None
        return (measured[-1][1] - measured[0][1]) / measured[0][1]


class Replicas:
    """The app's replicas as the soak sees them: lives, RSS samples, kills and restarts."""

    def __init__(self, app: str, expected: int, started: float) -> None:
        self.app = app
        self.expected = expected
        self.started = started
        self.lives: dict[str, ReplicaLife] = {}
        self.kills: list[dict[str, Any]] = []
        self._first_sample = True  # the replicas it finds were born with the load

    def now_s(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def sample(self) -> dict[str, dict[str, Any]]:
        """Note who is alive and their RSS; a name that disappeared died."""
        stats = live_replicas(self.app)
        now = self.now_s()
        for name, s in stats.items():
            life = self.lives.setdefault(name, ReplicaLife(s["pid"], 0.0 if self._first_sample else now))
            try:
                life.rss.append((now, psutil.Process(life.pid).memory_info().rss))
            except psutil.Error:
                continue
        for name, life in self.lives.items():
            if name not in stats and life.died_s is None:
                life.died_s = now
        self._first_sample = False
        return stats

    def kill_busiest(self) -> dict[str, Any]:
        """SIGKILL the replica holding the most requests (a crash: Serve replaces it, its requests migrate)."""
        stats = self.sample()
        name, victim = max(stats.items(), key=lambda item: item[1]["num_running"] + item[1]["num_waiting"])
        os.kill(victim["pid"], signal.SIGKILL)
        kill = {"t_s": self.now_s(), "replica": name, "pid": victim["pid"], "num_running": victim["num_running"],
                "num_waiting": victim["num_waiting"], "restarted_after_s": None}  # fmt: skip
        self.lives[name].died_s = kill["t_s"]
        self.kills.append(kill)
        return kill

    def wait_restarted(self, kill: dict[str, Any], timeout_s: float) -> None:
        """Until the app has its replicas again, the victim replaced; notes how long that took."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.sample()
            if len(stats) == self.expected and kill["replica"] not in stats:
                kill["restarted_after_s"] = round(self.now_s() - kill["t_s"], 1)
                return
            time.sleep(1.0)
        raise TimeoutError(f"replica {kill['replica']} not replaced within {timeout_s:.0f}s")

    def drained(self) -> dict[str, dict[str, Any]] | None:
        stats = self.sample()
        done = len(stats) == self.expected and all(s["num_running"] + s["num_waiting"] == 0 for s in stats.values())
        return stats if done else None


# --- the ingress's counters ------------------------------------------------------------------------------------

_SERIES = re.compile(r'^ray_paged_serve_router_(requests|migrations)_total\{(.*)\}\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape_counters(metrics_url: str, app: str) -> tuple[Counter, Counter]:
    """(requests by (endpoint, status), migrations by reason) of `app`'s ingress, from Ray's Prometheus export."""
    requests: Counter = Counter()
    migrations: Counter = Counter()
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        match = _SERIES.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group(2)))
        if labels.get("application") != app:
            continue
        value = int(float(match.group(3)))
        if match.group(1) == "requests":
            requests[(labels.get("endpoint"), int(labels.get("status_code", 0)))] += value
        else:
            migrations[labels.get("reason")] += value
    return requests, migrations


def metrics_mismatch(client: Counter, server: Counter, unanswered: int, dropped: int) -> str | None:
    """Why the server's request counts disagree with the client's (the module docstring's rule), or None."""
    client = Counter({key: v for key, v in client.items() if key[0] in ENDPOINTS})
    server = Counter({key: v for key, v in server.items() if key[0] in ENDPOINTS})
    short = {f"{e} {s}": (client[(e, s)], server[(e, s)]) for e, s in client if server[(e, s)] < client[(e, s)]}
    if sum(client[key] - server[key] for key in client if server[key] < client[key]) > dropped:
        return f"server counted fewer than the client (client, server), over the {dropped} dropped streams: {short}"
    surplus = sum(server.values()) - sum(client.values())
    if surplus > unanswered:
        return f"server counted {surplus} more than the client, over the {unanswered} it left unanswered"
    return None


def shortfall(client: Counter, server: Counter) -> int:
    """Responses the client saw start that the server has not counted (yet)."""
    return sum(max(0, v - server[key]) for key, v in client.items() if key[0] in ENDPOINTS)


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Criterion:
    name: str
    passed: bool | None  # None: not measured (reported only)
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def run_soak(url: str, app: str, metrics_url: str, config: SoakConfig, expected_replicas: int = 2,
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Load the app for `config.minutes` with kills, drain, and judge the run; the results as a dict."""
    started = time.monotonic()
    replicas = Replicas(app, expected_replicas, started)
    replicas.sample()
    clients = Clients(url, config)
    duration_s = config.minutes * 60
    deadline = started + duration_s
    samples: list[dict[str, Any]] = []

    def progress(stats: dict[str, dict[str, Any]]) -> None:
        tally = clients.tally
        rss = {life.pid: round(life.rss[-1][1] / 2**20) for name, life in replicas.lives.items()
               if name in stats and life.rss}  # fmt: skip
        samples.append({"t_s": replicas.now_s(), "rss_mib": rss, "outcomes": dict(tally.outcomes)})
        log(f"t={replicas.now_s():7.1f}s sent {clients.sent} {dict(tally.outcomes)} failures {dict(tally.failures)} "
            f"kills {len(replicas.kills)} rss MiB {rss} running {[s['num_running'] for s in stats.values()]}")

    async def monitor() -> None:
        next_kill = started + config.kill_every_min * 60 if config.kill_every_min else float("inf")
        while time.monotonic() < deadline:
            await asyncio.sleep(min(config.sample_s, max(0.0, deadline - time.monotonic())))
            more = config.max_kills is None or len(replicas.kills) < config.max_kills
            if more and next_kill <= time.monotonic() < deadline:
                kill = await asyncio.to_thread(replicas.kill_busiest)
                log(f"t={kill['t_s']:7.1f}s KILL {kill['replica']} (pid {kill['pid']}, {kill['num_running']} running)")
                await asyncio.to_thread(replicas.wait_restarted, kill, config.restart_timeout_s)
                log(f"t={replicas.now_s():7.1f}s replaced after {kill['restarted_after_s']}s")
                next_kill += config.kill_every_min * 60
            progress(await asyncio.to_thread(replicas.sample))

    async def load() -> None:
        await asyncio.gather(monitor(), *(clients.user(deadline) for _ in range(config.users)))

    asyncio.run(load())
    load_s = replicas.now_s()
    log(f"t={load_s:7.1f}s load stopped; draining")
    # Cancelled requests are aborted asynchronously; a replica killed near the end may still be starting.
    final = wait_until(replicas.drained, config.drain_timeout_s, "the replicas to drain")
    leaked = {name: s["num_total_blocks"] - s["num_free_blocks"] for name, s in final.items()}
    tally = clients.tally

    scrapes: list[Counter] = []

    def settled() -> tuple[Counter, Counter] | None:
        """The counters once they cover every response the client saw start, or stopped moving for 30 s (polled
        every 0.5 s; Ray exports every 10 s by default)."""
        server, migrations = scrape_counters(metrics_url, app)
        scrapes.append(server)
        stable = len(scrapes) > 60 and scrapes[-61] == server
        return (server, migrations) if shortfall(tally.answered, server) == 0 or stable else None

    try:
        server, migrations = wait_until(settled, config.metrics_timeout_s, "the counters to settle")
    except TimeoutError:
        server, migrations = scrape_counters(metrics_url, app)
    dropped = tally.outcomes["dropped"]
    mismatch = metrics_mismatch(tally.answered, server, tally.unanswered, dropped)

    warmup_s = config.warmup_minutes * 60
    growth = {f"{name.rsplit('#', 1)[-1]} (pid {life.pid})": life.growth(warmup_s)
              for name, life in replicas.lives.items()}  # fmt: skip
    measured = [g for g in growth.values() if g is not None]
    criteria = [
        Criterion("failed requests = 0", tally.outcomes["failed"] == 0,
                  f"{tally.outcomes['failed']} failed {dict(tally.failures)}"),
        Criterion("leaked KV blocks = 0 (every live replica, drained)", sum(leaked.values()) == 0,
                  f"{sum(leaked.values())} leaked over {len(final)} replicas"),
        Criterion(f"replica RSS growth < {config.max_rss_growth:.0%} after warm-up",
                  all(g < config.max_rss_growth for g in measured) if measured else None,
                  ", ".join(f"{k}: {'not measured' if g is None else f'{g:+.1%}'}" for k, g in growth.items())),
        Criterion("metrics consistent with the client", mismatch is None, mismatch or "requests by endpoint/status "
                  f"agree; {tally.unanswered} left unanswered by the client, {shortfall(tally.answered, server)} of "
                  f"{dropped} dropped streams not counted by the server"),
    ]  # fmt: skip
    return {
        "config": config.model_dump(),
        "load_s": load_s,
        "requests_sent": clients.sent,
        "outcomes": dict(tally.outcomes),
        "failures": dict(tally.failures),
        "failure_examples": tally.examples,
        "client_by_status": {f"{e} {s}": v for (e, s), v in sorted(tally.answered.items())},
        "server_by_status": {f"{e} {s}": v for (e, s), v in sorted(server.items())},
        "client_unanswered": tally.unanswered,
        "migrations": dict(migrations),
        "kills": replicas.kills,
        "leaked_blocks": leaked,
        "rss_growth": growth,
        "replica_lives": {name: {"pid": life.pid, "born_s": life.born_s, "died_s": life.died_s,
                                 "rss_mib_first_last": [round(life.rss[0][1] / 2**20, 1),
                                                        round(life.rss[-1][1] / 2**20, 1)] if life.rss else None}
                          for name, life in replicas.lives.items()},  # fmt: skip
        "criteria": [{"name": c.name, "verdict": c.verdict, "detail": c.detail} for c in criteria],
        "passed": all(c.passed is not False for c in criteria),
        "samples": samples,
    }


def markdown(result: dict[str, Any]) -> str:
    """The run's summary for the README."""
    config = result["config"]
    lines = [
        f"Soak: {config['minutes']:g} min, {config['users']} closed-loop users, a replica killed every "
        f"{config['kill_every_min']:g} min ({len(result['kills'])} kills), {config['disconnect_fraction']:.0%} "
        f"client disconnects; {result['requests_sent']} requests: {result['outcomes']}; migrations "
        f"{result['migrations']}.",
        "",
        "| criterion | verdict | detail |",
        "|---|---|---|",
        *(f"| {c['name']} | {c['verdict']} | {c['detail']} |" for c in result["criteria"]),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    from bench.servers import ServeCluster
    from replicas.default_model import DEFAULT_MODEL_DIR

    # SIGTERM (`timeout`, `kill`) and Ctrl-C end the run through the `finally` that stops the servers.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakConfig()
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--kill-every-min", type=float, default=defaults.kill_every_min)
    parser.add_argument("--max-kills", type=int, default=None, help="at most this many kills (default: no limit)")
    parser.add_argument("--warmup-minutes", type=float, default=defaults.warmup_minutes)
    parser.add_argument("--disconnect-fraction", type=float, default=defaults.disconnect_fraction)
    parser.add_argument("--sample-s", type=float, default=defaults.sample_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.json")
    parser.add_argument("--engine", type=json.loads, default={},
                        help='engine overrides as JSON, e.g. \'{"prepack_weights": true}\'')  # fmt: skip
    args = parser.parse_args()
    config = SoakConfig(minutes=args.minutes, users=args.users, kill_every_min=args.kill_every_min,
                        max_kills=args.max_kills, warmup_minutes=args.warmup_minutes, seed=args.seed,
                        disconnect_fraction=args.disconnect_fraction, sample_s=args.sample_s)  # fmt: skip

    app = "soak"
    engine = {"kv_cache_memory_bytes": 256 * 2**20, "max_num_seqs": 16, "max_model_len": 1024, "num_threads": 1,
              **args.engine}
    cluster = ServeCluster({app: engine}, args.model, Path(tempfile.mkdtemp(prefix="soak-")), num_cpus=4,
                           app_overrides={"args.num_replicas": 2, "args.replica_num_cpus": 1, "deployments": []})
    try:
        cluster.start()
        print(f"soak: {config.minutes:g} min against {cluster.url(app)} (engine {engine}; logs {cluster.log_dir})",
              flush=True)
        result = run_soak(cluster.url(app), app, cluster.metrics_url, config,
                          log=lambda line: print(line, flush=True))  # fmt: skip
    finally:
        cluster.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    summary = markdown(result)
    args.output.with_suffix(".md").write_text(summary)
    print(summary)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
