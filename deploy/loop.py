"""Wiring of the offline side for the CLI and the demo: the registry, the cycle context, the
scheduler thread, and one cycle run here with a progress bar."""

from __future__ import annotations

import threading
import time

from pydantic import ValidationError

from service.registry import Registry
from service.runs import get_run
from service.settings import OFFLINE_SECTIONS, Settings, reject_unknown_settings, settings_error
from service.store import Store, TrainingRun
from training.config import TrainingSettings
from training.cycle import CycleContext, run_cycle
from training.scheduler import Scheduler


def open_registry(settings: Settings) -> Registry:
    store = Store(settings.resolved_database_url)
    store.upgrade()
    registry = Registry(store, settings.data_dir)
    registry.ensure_base(settings.resolved_model_path)
    return registry


def training_settings(settings: Settings) -> TrainingSettings:
    """The offline side's sections, checked as `load_settings` checks the service's."""
    reject_unknown_settings(TrainingSettings, sections=OFFLINE_SECTIONS)
    try:
        return TrainingSettings(data_dir=settings.data_dir)
    except ValidationError as exc:
        raise settings_error(exc) from None


def cycle_context(settings: Settings) -> CycleContext:
    return CycleContext(
        registry=open_registry(settings),
        settings=training_settings(settings),
        database_url=settings.resolved_database_url,
    )


def start_scheduler(settings: Settings) -> Scheduler:
    scheduler = Scheduler(cycle_context(settings))
    scheduler.start()
    return scheduler


def run_with_progress(ctx: CycleContext, run_id: str) -> TrainingRun:
    """Run the cycle in a thread and show its training steps as they are stored."""
    from tqdm import tqdm

    done: list[TrainingRun] = []
    worker = threading.Thread(target=lambda: done.append(run_cycle(ctx, run_id)), daemon=True)
    worker.start()
    with tqdm(desc=run_id, unit="step") as bar:
        while worker.is_alive():
            worker.join(1.0)
            run = get_run(ctx.store, run_id)
            if len(run.step_metrics) > bar.n:
                bar.update(len(run.step_metrics) - bar.n)
                last = run.step_metrics[-1]
                bar.set_postfix(
                    {
                        k.split("/")[-1]: round(v, 3)
                        for k, v in last.items()
                        if k in ("loss", "rewards/accuracies", "rewards/margins", "reward", "kl")
                    }
                )
            bar.set_description(f"{run_id} {run.status}")
            time.sleep(0.2)
    return done[0]
