"""Render the dashboard's panels from live Prometheus data into one PNG (matplotlib), for people without Grafana.

Each panel's queries run as Prometheus range queries (`/api/v1/query_range`) with the dashboard's variables
filled in; each returned series becomes one line, labelled by the panel's legend format.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.grafana.dashboard import expand, panels

# Grafana units the snapshot knows how to label; values are scaled for display.
_UNITS = {"s": ("seconds", 1.0), "percentunit": ("%", 100.0), "reqps": ("requests/s", 1.0), "ops": ("per second", 1.0)}


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    times: list[float]  # unix seconds
    values: list[float]


def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float, timeout_s: float = 30) -> list[Series]:
    """One Prometheus range query; raises on an HTTP or query error."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{prometheus_url.rstrip('/')}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 — an operator-given URL
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body.get('error')}")
    return [
        Series(
            result["metric"],
            [float(t) for t, _ in result["values"]],
            [float(v) for _, v in result["values"]],
        )
        for result in body["data"]["result"]
    ]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match.group(1), ""), template) or "value"


def render_snapshot(
    prometheus_url: str,
    out: Path,
    dashboard: dict[str, Any],
    minutes: float = 15.0,
    rate_interval: str = "1m",
    model: str = ".*",
    end: float | None = None,
) -> dict[str, int]:
    """Write the PNG; returns each panel's title with the number of series it drew (0: no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = end if end is not None else time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)  # about 240 points per line
    shown = panels(dashboard)
    columns = 3
    rows = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 5.2, rows * 2.9), squeeze=False)
    drawn: dict[str, int] = {}
    for axis, panel in zip(axes.flat, shown):
        unit_label, scale = _UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""), ("", 1.0))
        count = 0
        for target in panel.get("targets", []):
            expr = expand(target["expr"], rate_interval=rate_interval, model=model)
            for series in query_range(prometheus_url, expr, start, end, step):
                points = [(t, v * scale) for t, v in zip(series.times, series.values) if math.isfinite(v)]
                if not points:
                    continue
                axis.plot([(t - end) / 60 for t, _ in points], [v for _, v in points], linewidth=1.2,
                          label=legend(target.get("legendFormat", ""), series.labels))  # fmt: skip
                count += 1
        drawn[panel["title"]] = count
        axis.set_title(panel["title"], fontsize=9)
        axis.set_xlim(-minutes, 0)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("minutes before the end", fontsize=7)
        if unit_label:
            axis.set_ylabel(unit_label, fontsize=7)
        axis.grid(alpha=0.3)
        if count:
            axis.legend(fontsize=6, loc="upper left")
        else:
            axis.text(0.5, 0.5, "no data", transform=axis.transAxes, ha="center", va="center", color="gray")
    for axis in list(axes.flat)[len(shown) :]:
        axis.set_visible(False)
    stamp = datetime.fromtimestamp(end, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figure.suptitle(f"{dashboard.get('title', 'dashboard')}: last {minutes:g} min to {stamp} (from {prometheus_url})")
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=72)
    plt.close(figure)
    return drawn
