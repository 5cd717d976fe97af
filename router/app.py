"""The Serve application: `OpenAIIngress` -> `LLMReplica`s behind the KV-aware request router.

`serve run deploy/config.yaml` calls `build_app` with the config's `args`; tests call it directly.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig
from ray.serve.request_router import RequestRouter

from replicas.config import EngineConfig
from replicas.deployment import DEFAULT_STREAM_MESSAGES_PER_S, LLMReplica
from router.ingress import IngressConfig, OpenAIIngress

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
KV_AWARE_ROUTER = "router.request_router:KVAwareRequestRouter"


class AppArgs(BaseModel):
    """Everything `build_app` accepts (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    engine: dict[str, Any] = Field(
        default_factory=dict, description="more EngineConfig fields (block_size, ...), validated with `model`"
    )
    num_replicas: int | None = Field(default=None, ge=1, description="None: Serve's default or autoscaling_config")
    replica_num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per replica (torch threads)")
    replica_num_gpus: float = Field(default=0.0, ge=0, description="1 on GPU machines")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica: only nodes that advertise them host one"
    )
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, description="at most this many engine replicas per node (1: one per node, spread)"
    )
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Serve AutoscalingConfig fields for the replicas; exclusive with num_replicas"
    )
    ingress_num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per ingress replica (tokenizing)")
    max_queued_requests: int = Field(default=128, ge=1, description="per caller, beyond the replicas' slots: 429")
    retry_after_s: float = Field(default=1.0, ge=0)
    stall_timeout_s: float = Field(default=60.0, gt=0, description="health check fails after this long stalled")
    routing_stats_period_s: float = Field(default=1.0, gt=0)
    stream_messages_per_s: float | None = Field(
        default=DEFAULT_STREAM_MESSAGES_PER_S, gt=0,
        description="most stream messages a replica sends per second over all its requests: with many streams "
        "open, each stream's deltas are merged over 1/(this/streams) s (None: one message per step per request)",
    )  # fmt: skip
    kv_transfer: bool = Field(
        default=True, description="replicas fetch a request's cached prefix from the replica holding it when the "
        "router sends it elsewhere (replicas/kv_transfer.py; same node only: 127.0.0.1)",
    )  # fmt: skip
    request_router: str = Field(
        default=KV_AWARE_ROUTER, description="`module:Class` of the replicas' Serve RequestRouter (bench/routing.py "
        "compares others: router/baseline_routers.py, Serve's PowerOfTwoChoicesRequestRouter)",
    )  # fmt: skip
    router: dict[str, Any] = Field(default_factory=dict, description="the request router's initialize_state kwargs")
    ingress: dict[str, Any] = Field(default_factory=dict, description="more IngressConfig fields (api_key, max_n...)")

    _engine_config: EngineConfig = PrivateAttr()

    @property
    def engine_config(self) -> EngineConfig:
        """The replicas' `EngineConfig`: `model`, `served_model_name` and `engine`, validated when the args load."""
        return self._engine_config

    @model_validator(mode="after")
    def _engine_config_is_valid(self) -> AppArgs:
        # NOTE: validated here, so a bad engine field fails `serve deploy` / `build_app` and not, later, every
        # replica's start.
        for name in ("model", "served_model_name"):
            if name in self.engine:
                raise ValueError(f"engine.{name}: set `{name}` at the top level of args (the ingress reads it too)")
        try:
            config = EngineConfig(model=self.model, served_model_name=self.served_model_name, **self.engine)
        except ValidationError as error:
            problems = "; ".join(f"{_engine_field(issue['loc'])}: {issue['msg']}" for issue in error.errors())
            raise ValueError(f"invalid engine config: {problems}") from None
        if config.num_threads is None and self.replica_num_cpus < 1:
            config.num_threads = 1  # a fractional CPU: one torch thread, not as many as the node has cores
        self._engine_config = config
        return self

    @field_validator("request_router")
    @classmethod
    def _request_router_imports(cls, path: str) -> str:
        # NOTE: imported here, so a misspelt class fails `build_app` and not, later, every caller's first request.
        module_name, _, class_name = path.partition(":")
        if not module_name or not class_name:
            raise ValueError(f"{path!r}: expected `module:Class`")
        try:
            router_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{path!r} does not import: {error}") from None
        if not (isinstance(router_class, type) and issubclass(router_class, RequestRouter)):
            raise ValueError(f"{path!r} is not a ray.serve.request_router.RequestRouter")
        return path

    @model_validator(mode="after")
    def _one_replica_count(self) -> AppArgs:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas (a fixed count) or autoscaling_config, not both")
        if self.autoscaling_config is not None:
            unknown = sorted(set(self.autoscaling_config) - set(AutoscalingConfig.model_fields))
            if unknown:  # Serve would ignore a misspelt field silently
                raise ValueError(f"unknown autoscaling_config fields {unknown}; see ray.serve.config.AutoscalingConfig")
            AutoscalingConfig(**self.autoscaling_config)  # bad bounds fail here, at the edge, not in the controller
        return self


def _engine_field(loc: tuple[int | str, ...]) -> str:
    """Where a bad EngineConfig field is set in the args: `model` and `served_model_name` at the top level."""
    if loc and loc[0] in ("model", "served_model_name"):
        return str(loc[0])
    return ".".join(str(part) for part in ("engine", *loc))


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The application for `args` (a dict from a config file or an `AppArgs`)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    engine_config = args.engine_config
    actor_options: dict[str, Any] = {"num_cpus": args.replica_num_cpus}
    if args.replica_num_gpus:
        actor_options["num_gpus"] = args.replica_num_gpus
    if args.replica_resources:
        actor_options["resources"] = dict(args.replica_resources)
    router_kwargs = dict(args.router)
    if args.request_router == KV_AWARE_ROUTER:
        router_kwargs = {"stats_stale_after_s": max(5.0, 5 * args.routing_stats_period_s), **router_kwargs}
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        # NOTE: one slot per sequence the engine batches; requests beyond wait in the caller's queue (bounded
        # below), where the router can still send them to another replica.
        "max_ongoing_requests": engine_config.max_num_seqs,
        "max_queued_requests": args.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s),
        "request_router_config": RequestRouterConfig(
            request_router_class=args.request_router,
            request_router_kwargs=router_kwargs,
            request_routing_stats_period_s=args.routing_stats_period_s,
            request_routing_stats_timeout_s=max(10.0, 5 * args.routing_stats_period_s),
            # A request waiting for a slot (every replica saturated, or held for its prefix's holder) is asked
            # about again at most this often: Serve's 0.5 s default leaves a freed slot idle that long.
            max_backoff_s=0.2,
        ),
    }
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    if args.autoscaling_config is not None:
        options["autoscaling_config"] = args.autoscaling_config
    if args.max_replicas_per_node is not None:
        # NOTE: Serve already places replicas with Ray's SPREAD strategy; this is the hard cap on top of it.
        options["max_replicas_per_node"] = args.max_replicas_per_node
    replica = LLMReplica.options(**options).bind(
        engine_config.model_dump(exclude_defaults=True), stall_timeout_s=args.stall_timeout_s,
        stream_messages_per_s=args.stream_messages_per_s, kv_transfer=args.kv_transfer,
    )  # fmt: skip
    ingress_config = IngressConfig(
        model=args.model,
        tokenizer=engine_config.tokenizer,
        served_model_name=args.served_model_name,
        **args.ingress,
    )
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus})
    return ingress.bind(replica, ingress_config.model_dump())
