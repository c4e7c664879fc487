"""`prefloop`: the command line.

    prefloop bootstrap            convert the embedded model into the data directory (once)
    prefloop serve [--port N]     start (or join) Ray, deploy the Serve app and the scheduler,
                                  serve until stopped
    prefloop train [--queue]      run one training cycle now, with a progress bar (or queue it
                                  for the scheduler of a running `prefloop serve`)
    prefloop train --if-due       run a cycle only if one is queued or due (a periodic job)
    prefloop versions             list model versions
    prefloop promote VERSION      serve VERSION on every replica (a rollback is the same)
    prefloop status               served version, pending feedback, last and current runs

Settings come from `PREFLOOP_...` variables and the file named by `PREFLOOP_CONFIG` (or
`--config`); the flags here override the few that are changed most often.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from service.request_ids import configure_logging
from service.settings import SettingsError, load_settings
from service.store import DatabaseUnreachable


def _overrides(args: argparse.Namespace) -> dict:
    names = ("host", "port", "replicas", "ray_address", "model_path", "database_url")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from deploy.bootstrap import ensure_embedded_model

    settings = load_settings(**_overrides(args))
    print(ensure_embedded_model(settings.data_dir))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from deploy.loop import start_scheduler, training_settings

    settings = load_settings(**_overrides(args))
    scheduler_enabled = training_settings(settings).scheduler.enabled  # checked before Ray starts
    from service import deployment

    # The database first: an unreachable one stops here, before a model download or Ray's start.
    deployment.prepare_store(settings)
    if settings.model_path is None:
        from deploy.bootstrap import ensure_embedded_model

        ensure_embedded_model(settings.data_dir)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployment.deploy(settings)
    scheduler = None
    if scheduler_enabled:
        scheduler = start_scheduler(settings)
    print(
        f"prefloop: serving on http://{settings.bind_host}:{settings.port}  (Ctrl-C stops)",
        flush=True,
    )
    stop.wait()
    if scheduler is not None:
        scheduler.stop()
    deployment.shutdown()
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from deploy.loop import cycle_context, run_with_progress
    from service.errors import Conflict
    from service.runs import queue_run, recent_runs
    from service.store import TrainingRun
    from training.scheduler import backoff, due_trigger

    settings = load_settings(**_overrides(args))
    ctx = cycle_context(settings)
    run: TrainingRun | None = None
    trigger: str | None = "manual"
    if args.if_due:
        # The periodic entry point (a CronJob): a queued run, or an automatic one if due.
        run = next((r for r in recent_runs(ctx.store) if r.status == "queued"), None)
        if run is None:
            trigger = due_trigger(ctx)
            if trigger is None:
                waiting = backoff(ctx)
                print(
                    "no training due"
                    + (
                        f" (after {waiting['failed_in_a_row']} failed cycles, none starts "
                        f"before {waiting['retry_after']})"
                        if waiting["waiting"]
                        else ""
                    )
                )
                return 0
    try:
        if run is None:
            run = queue_run(ctx.store, trigger or "manual", "cli")
    except Conflict as exc:
        print(f"prefloop: {exc.message}", file=sys.stderr)
        return 0 if args.if_due else 1
    if args.queue:
        print(f"queued {run.id}; a running `prefloop serve` picks it up")
        return 0
    import ray

    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
    run = run_with_progress(ctx, run.id)
    print(
        json.dumps(
            {
                "run": run.id,
                "status": run.status,
                "candidate": run.candidate_version_id,
                "stages_s": run.stages,
                "error": run.error,
            },
            indent=2,
        )
    )
    # A rejected candidate is the gate working, not a failed job.
    return 1 if run.status == "failed" else 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from deploy.loop import open_registry

    registry = open_registry(load_settings(**_overrides(args)))
    served = registry.served().version.id
    print(f"{'':2}{'version':28}{'parent':28}{'kind':6}{'status':10}reason")
    for v in registry.versions():
        mark = "*" if v.id == served else ""
        print(f"{mark:2}{v.id:28}{v.parent_id or '-':28}{v.kind:6}{v.status:10}{v.reason or ''}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from deploy.loop import open_registry
    from service.errors import ApiError

    registry = open_registry(load_settings(**_overrides(args)))
    try:
        promo = registry.promote(args.version, actor="cli")
    except ApiError as exc:
        print(f"prefloop: {exc.message}", file=sys.stderr)
        return 1
    print(f"{promo.action}: {promo.version_id} (replicas follow within a second)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from deploy.loop import cycle_context
    from service.admin import loop_status
    from training.preference_sets import build
    from training.scheduler import backoff

    settings = load_settings(**_overrides(args))
    ctx = cycle_context(settings)
    status = loop_status(ctx.registry)
    status["feedback"]["usable_now"] = build(ctx.store, ctx.settings.snapshot).usable
    status["scheduler"] = backoff(ctx)
    print(json.dumps(status, indent=2, default=str))
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
    train = sub.add_parser("train", help="run one training cycle now")
    train.add_argument(
        "--queue", action="store_true", help="only queue it for a running `prefloop serve`"
    )
    train.add_argument(
        "--if-due",
        dest="if_due",
        action="store_true",
        help="run the queued cycle, or one the scheduler's thresholds call for; otherwise do "
        "nothing (for a periodic job)",
    )
    train.set_defaults(run=_cmd_train)
    sub.add_parser("versions", help="list model versions").set_defaults(run=_cmd_versions)
    promote = sub.add_parser("promote", help="serve a version (promotion or rollback)")
    promote.add_argument("version")
    promote.set_defaults(run=_cmd_promote)
    sub.add_parser("status", help="the loop's state").set_defaults(run=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["PREFLOOP_CONFIG"] = args.config
    configure_logging(os.environ.get("PREFLOOP_LOG_LEVEL", "INFO"))
    try:
        return args.run(args)
    except (SettingsError, DatabaseUnreachable) as exc:
        print(f"prefloop: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
