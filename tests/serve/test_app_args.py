"""`build_app`'s args: the engine config is validated when they load, and the replica's settings come from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from router.app import AppArgs, build_app


def replica_deployment(args: dict[str, Any]) -> Any:
    ingress = build_app(args)._bound_deployment
    return ingress.init_args[0]._bound_deployment


@pytest.mark.parametrize(
    ("engine", "named"),
    [
        ({"block_sise": 8}, "engine.block_sise"),
        ({"block_size": 12}, "engine.block_size"),
        ({"scheduling_policy": "lifo"}, "engine.scheduling_policy"),
        ({"max_num_seqs": 0}, "engine.max_num_seqs"),
        ({"model": "elsewhere"}, "engine.model"),
    ],
)
def test_a_bad_engine_field_fails_when_the_args_load_naming_the_field(
    default_model_dir: Path, engine: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named.replace(".", r"\.")):
        AppArgs.model_validate({"model": str(default_model_dir), "engine": engine})


def test_a_missing_model_directory_fails_when_the_args_load(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="model: .*does not exist"):
        AppArgs.model_validate({"model": str(tmp_path / "nowhere")})


def test_the_engine_config_carries_model_and_served_name(default_model_dir: Path) -> None:
    args = AppArgs.model_validate(
        {"model": str(default_model_dir), "served_model_name": "smol", "engine": {"block_size": 8}}
    )
    assert args.engine_config.model == str(default_model_dir)
    assert args.engine_config.served_model_name == "smol"
    assert args.engine_config.block_size == 8


@pytest.mark.parametrize(("engine", "slots"), [({}, 64), ({"max_num_seqs": 7}, 7)])
def test_replica_slots_are_the_engines_max_num_seqs(default_model_dir: Path, engine: dict, slots: int) -> None:
    """One Serve slot per sequence the engine batches, its default included (no second copy of the default)."""
    assert replica_deployment({"model": str(default_model_dir), "engine": engine}).max_ongoing_requests == slots


def test_fractional_cpu_replicas_run_one_engine_thread(default_model_dir: Path) -> None:
    (engine_config,) = replica_deployment({"model": str(default_model_dir), "replica_num_cpus": 0.5}).init_args
    assert engine_config["num_threads"] == 1


def router_config(args: dict[str, Any]) -> Any:
    return replica_deployment(args)._deployment_config.request_router_config


def test_the_kv_aware_router_is_the_default(default_model_dir: Path) -> None:
    config = router_config({"model": str(default_model_dir)})
    assert config.request_router_class == "router.request_router:KVAwareRequestRouter"
    assert "stats_stale_after_s" in config.request_router_kwargs


@pytest.mark.parametrize(
    "path",
    [
        "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
        "router.baseline_routers:RoundRobinRequestRouter",
        "router.baseline_routers:TokenPrefixCacheAffinityRouter",
    ],
)
def test_another_request_router_can_be_chosen(default_model_dir: Path, path: str) -> None:
    config = router_config({"model": str(default_model_dir), "request_router": path})
    assert config.request_router_class == path
    assert config.request_router_kwargs == {}  # ours' kwargs are not passed to another class


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("router.request_router.KVAwareRequestRouter", "expected `module:Class`"),
        ("router.request_router:NoSuchRouter", "does not import"),
        ("router.app:AppArgs", "is not a ray.serve.request_router.RequestRouter"),
    ],
)
def test_a_bad_request_router_fails_when_the_args_load(default_model_dir: Path, path: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        AppArgs.model_validate({"model": str(default_model_dir), "request_router": path})
