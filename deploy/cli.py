"""`prefloop`: the command line.

    prefloop bootstrap            convert the embedded model into the data directory (once)
    prefloop serve [--port N]     start (or join) Ray, deploy the Serve app, serve until stopped

Settings come from `PREFLOOP_...` variables and the file named by `PREFLOOP_CONFIG` (or
`--config`); the flags here override the few that are changed most often.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from service.settings import SettingsError, load_settings


def _overrides(args: argparse.Namespace) -> dict:
    names = ("host", "port", "replicas", "ray_address", "model_path", "database_url")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from deploy.bootstrap import ensure_embedded_model

    settings = load_settings(**_overrides(args))
    print(ensure_embedded_model(settings.data_dir))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(**_overrides(args))
    if settings.model_path is None:
        from deploy.bootstrap import ensure_embedded_model

        ensure_embedded_model(settings.data_dir)
    from service import deployment

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment.deploy(settings)
    print(
        f"prefloop: serving on http://{settings.bind_host}:{settings.port}  (Ctrl-C stops)",
        flush=True,
    )
    stop.wait()
    deployment.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML settings file (same as PREFLOOP_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("bootstrap", help="convert the embedded model into the data directory")
    boot.set_defaults(run=_cmd_bootstrap)
    serve = sub.add_parser("serve", help="serve the chat and feedback API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--replicas", type=int)
    serve.add_argument("--ray-address", dest="ray_address", help="join this Ray cluster")
    serve.add_argument("--model-path", dest="model_path")
    serve.add_argument("--database-url", dest="database_url")
    serve.set_defaults(run=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["PREFLOOP_CONFIG"] = args.config
    logging.basicConfig(
        level=os.environ.get("PREFLOOP_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except SettingsError as exc:
        print(f"prefloop: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
