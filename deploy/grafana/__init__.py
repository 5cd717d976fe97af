"""The Grafana dashboard (`dashboard.json`), its provisioning through Grafana's HTTP API, and a PNG snapshot.

    python -m deploy.grafana provision --url http://127.0.0.1:3000 --token "$GRAFANA_TOKEN" \
        --prometheus-url http://127.0.0.1:9090
    python -m deploy.grafana snapshot --prometheus http://127.0.0.1:9090 --out snapshot.png
"""

from deploy.grafana.dashboard import DASHBOARD_PATH, load_dashboard, metric_names, panel_queries

__all__ = ["DASHBOARD_PATH", "load_dashboard", "metric_names", "panel_queries"]
