"""`python -m deploy.grafana provision ...` and `python -m deploy.grafana snapshot ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from deploy.grafana.dashboard import DASHBOARD_PATH, load_dashboard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.grafana", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    provision = commands.add_parser("provision", help="create or update the datasource, folder and dashboard")
    provision.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://127.0.0.1:3000")
    provision.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                           help="a service account token (default: $GRAFANA_TOKEN)")  # fmt: skip
    provision.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                           help="Prometheus as Grafana's server reaches it")  # fmt: skip
    provision.add_argument("--scrape-interval", default="15s", help="Prometheus's scrape interval")
    provision.add_argument("--dashboard", type=Path, default=DASHBOARD_PATH)
    provision.add_argument("--timeout", type=float, default=10.0, help="seconds per API call")

    snapshot = commands.add_parser("snapshot", help="render every panel from live Prometheus data into one PNG")
    snapshot.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus's base URL")
    snapshot.add_argument("--out", type=Path, required=True, help="the PNG to write")
    snapshot.add_argument("--minutes", type=float, default=15.0, help="time range, ending at --end")
    snapshot.add_argument("--end", type=float, default=None, help="unix seconds (default: now)")
    snapshot.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    snapshot.add_argument("--model", default=".*", help="what $model becomes (a regex)")
    snapshot.add_argument("--dashboard", type=Path, default=DASHBOARD_PATH)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dashboard = load_dashboard(args.dashboard)
    if args.command == "provision":
        from grafana_client import GrafanaApi

        from deploy.grafana.provision import provision as run_provision

        if not args.token:
            parser.error("give --token or set GRAFANA_TOKEN")
        api = GrafanaApi.from_url(args.url, credential=args.token, timeout=args.timeout)
        result = run_provision(api, dashboard, args.prometheus_url, args.scrape_interval)
        print(f"datasource {result.datasource}, folder {result.folder}, dashboard {result.dashboard}"
              + (f": {args.url.rstrip('/')}{result.dashboard_url}" if result.dashboard_url else ""))  # fmt: skip
        return 0
    from deploy.grafana.snapshot import render_snapshot

    drawn = render_snapshot(
        args.prometheus, args.out, dashboard, args.minutes, args.rate_interval, args.model, end=args.end
    )
    empty = [title for title, count in drawn.items() if not count]
    print(f"wrote {args.out}: {len(drawn) - len(empty)} of {len(drawn)} panels with data"
          + (f"; no data: {', '.join(empty)}" if empty else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
