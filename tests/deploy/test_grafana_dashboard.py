"""The dashboard JSON is what Grafana imports: unique ids, a datasource and a query on every panel, every topic
the operators asked for. (That each query returns data from a real scrape is tests/serve/test_metrics.py's.)"""

from __future__ import annotations

import json
import re

import pytest

from deploy.grafana.dashboard import DASHBOARD_PATH, DATASOURCE_UID, load_dashboard, metric_names, panels


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def test_dashboard_is_valid_json_with_a_stable_uid(dashboard: dict) -> None:
    assert json.loads(DASHBOARD_PATH.read_text()) == dashboard
    assert dashboard["uid"] == "paged-serve" and dashboard["title"]


def test_panel_ids_and_uids_are_unique(dashboard: dict) -> None:
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    uids = [item["uid"] for item in [dashboard, *panels(dashboard)] if "uid" in item]
    assert len(uids) == len(set(uids))
    variables = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert len(variables) == len(set(variables))


def test_every_panel_has_a_prometheus_datasource_and_a_query(dashboard: dict) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


def test_datasource_variable_defaults_to_the_provisioned_datasource(dashboard: dict) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    assert variables["model"]["allValue"] == ".*"


def test_rates_use_grafanas_rate_interval(dashboard: dict) -> None:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            windows = re.findall(r"\[([^\]]+)\]", target["expr"])
            assert all(window == "$__rate_interval" for window in windows), target["expr"]


@pytest.mark.parametrize(
    "title_words, metric",
    [
        (("throughput",), "ray_paged_serve_generation_tokens_total"),
        (("time to first token",), "ray_paged_serve_time_to_first_token_seconds_bucket"),
        (("inter-token",), "ray_paged_serve_inter_token_latency_seconds_bucket"),
        (("end-to-end",), "ray_paged_serve_e2e_request_latency_seconds_bucket"),
        (("running", "waiting"), "ray_paged_serve_num_requests_waiting"),
        (("kv cache",), "ray_paged_serve_kv_cache_usage_perc"),
        (("prefix cache hit rate",), "ray_paged_serve_prefix_cache_hits_total"),
        (("preemptions",), "ray_paged_serve_num_preemptions_total"),
        (("batch size",), "ray_paged_serve_iteration_tokens_total_bucket"),
        (("per replica",), "ray_paged_serve_generation_tokens_total"),
        (("router decisions",), "ray_paged_serve_router_routing_decisions_total"),
        (("error rate",), "ray_paged_serve_router_requests_total"),
        (("migrations",), "ray_paged_serve_router_migrations_total"),
        (("predicted", "actual"), "ray_paged_serve_router_routing_predicted_hit_tokens_total"),
    ],
)
def test_dashboard_has_each_panel_operators_asked_for(dashboard: dict, title_words: tuple, metric: str) -> None:
    matching = [panel for panel in panels(dashboard) if all(word in panel["title"].lower() for word in title_words)]
    assert matching, title_words
    assert any(metric in metric_names(target["expr"]) for panel in matching for target in panel["targets"])


def test_predicted_hit_tokens_are_shown_next_to_the_actual_hits(dashboard: dict) -> None:
    (panel,) = [panel for panel in panels(dashboard) if "predicted vs actual" in panel["title"].lower()]
    by_legend = {target["legendFormat"]: metric_names(target["expr"]) for target in panel["targets"]}
    assert by_legend == {"predicted": {"ray_paged_serve_router_routing_predicted_hit_tokens_total"},
                         "actual": {"ray_paged_serve_prefix_cache_hits_total"}}  # fmt: skip


def test_latency_panels_show_p50_p95_p99(dashboard: dict) -> None:
    for panel in panels(dashboard):
        if panel["fieldConfig"]["defaults"]["unit"] == "s":
            quantiles = {re.search(r"histogram_quantile\(([0-9.]+)", t["expr"]).group(1) for t in panel["targets"]}
            assert quantiles == {"0.5", "0.95", "0.99"}, panel["title"]
            assert {t["legendFormat"] for t in panel["targets"]} == {"p50", "p95", "p99"}


def test_per_replica_panels_break_down_by_replica(dashboard: dict) -> None:
    per_replica = [panel for panel in panels(dashboard) if "per replica" in panel["title"].lower()]
    assert len(per_replica) >= 2
    for panel in per_replica:
        assert all("by (replica)" in target["expr"] for target in panel["targets"])


def test_metric_names_are_read_from_promql() -> None:
    expr = 'histogram_quantile(0.5, sum by (le) (rate(a_bucket{x=~"y"}[$__rate_interval]))) / b_total or vector(0)'
    assert metric_names(expr) == {"a_bucket", "b_total"}
