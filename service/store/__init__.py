"""The system of record: generations, feedback, model versions, preference snapshots and training
runs (SQLAlchemy 2, Alembic migrations)."""

from service.store.schema import (
    Feedback,
    Generation,
    GenerationChoice,
    ModelVersion,
    PreferenceSnapshot,
    Promotion,
    TrainingRun,
)
from service.store.store import DatabaseUnreachable, Store, used_feedback_ids
from service.store.writer import GroupCommitWriter

__all__ = [
    "DatabaseUnreachable",
    "Feedback",
    "Generation",
    "GenerationChoice",
    "GroupCommitWriter",
    "ModelVersion",
    "PreferenceSnapshot",
    "Promotion",
    "Store",
    "TrainingRun",
    "used_feedback_ids",
]
