"""The Grafana dashboard (`deploy/grafana/dashboard.json`) as data: its panels, their PromQL, the metrics they read.

The JSON file is the single source: Grafana imports it (`python -m deploy.grafana provision`), Kubernetes mounts
it as a ConfigMap (`deploy/kuberay.py`), the snapshot renders its queries, and the tests run them against a real
Prometheus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).with_name("dashboard.json")
DATASOURCE_UID = "paged-serve-prometheus"  # what provisioning names the datasource; the dashboard's default

# PromQL words that are not metric names: functions, aggregations, keywords, Grafana's variables.
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "vector", "or", "and", "unless", "on", "ignoring", "group_left", "group_right", "clamp_min", "clamp_max",
    "abs", "topk", "bottomk", "offset", "bool", "le",
}  # fmt: skip
# An identifier that is not a function call (those are followed by "(").
_IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str  # as in the dashboard: with Grafana's `$model` and `$__rate_interval`
    legend: str


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in rows included."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [panel for panel in found if panel.get("type") != "row"]


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["id"], panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def expand(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """The query as Grafana sends it to Prometheus, with the dashboard's variables filled in."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model", model)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (histogram series by their `_bucket` name)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_labels)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", r"\1", without_ranges)
    names = {match.group(1) for match in _IDENTIFIER.finditer(without_groupings)}
    return names - _PROMQL_WORDS
