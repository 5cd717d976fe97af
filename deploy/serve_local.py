"""`make serve`: a local Ray whose Prometheus endpoint is on a fixed loopback port, then `serve run` on it.

`serve run deploy/config.yaml` alone starts Ray with a random metrics export port. This starts the same local
Ray first, with `--metrics-export-port` (default 8080, what deploy/prometheus/prometheus.yml scrapes) and every
Ray endpoint on 127.0.0.1, then runs `serve run` with the remaining arguments in this process (`serve run` uses
the Ray it finds initialized). Ctrl-C shuts Serve down, and Ray with this process, as with `serve run`.

    python -m deploy.serve_local --metrics-export-port 8080 deploy/config.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_METRICS_EXPORT_PORT = 8080
# Serve's controller wakes every 0.1 s by default: ~6% of a core on a 2-core machine, spent reconciling a deployment
# that does not change (bench.serving --profile). Every 0.5 s it still notices a dead replica within a second.
# The cluster and KubeRay configs keep Ray's defaults.
LOCAL_RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.serve_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--metrics-export-port", type=int,
                        default=int(os.environ.get("METRICS_EXPORT_PORT", DEFAULT_METRICS_EXPORT_PORT)),
                        help="Ray's Prometheus endpoint: http://127.0.0.1:PORT/metrics (default 8080)")  # fmt: skip
    args, serve_run_args = parser.parse_known_args(argv)
    # NOTE: before Ray is imported. Ray's single-machine mode (its default on macOS and Windows): the node's
    # address is 127.0.0.1, so the metrics endpoint and Ray's other servers bind to loopback, not every interface.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name, value in LOCAL_RAY_ENV.items():  # the Ray processes started below inherit them
        os.environ.setdefault(name, value)
    import ray
    from ray.serve.scripts import run as serve_run

    # NOTE: no dashboard on a laptop (its head process costs CPU every second); the metrics export above does not
    # need it (the per-node agent serves it). The cluster and KubeRay configs keep the dashboard.
    ray.init(namespace="serve", include_dashboard=False, _metrics_export_port=args.metrics_export_port)
    print(f"Ray metrics (Prometheus): http://127.0.0.1:{args.metrics_export_port}/metrics", flush=True)
    return serve_run.main(args=serve_run_args, prog_name="serve run", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
