"""The system of record: generations, feedback, model versions, preference snapshots and training
runs (SQLAlchemy 2, Alembic migrations), and the local journal that holds writes while the
database is unreachable."""

from service.store.journal import Journal
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
from service.store.writer import GroupCommitWriter, Journaled, Queued

__all__ = [
    "DatabaseUnreachable",
    "Feedback",
    "Generation",
    "GenerationChoice",
    "GroupCommitWriter",
    "Journal",
    "Journaled",
    "ModelVersion",
    "PreferenceSnapshot",
    "Promotion",
    "Queued",
    "Store",
    "TrainingRun",
    "used_feedback_ids",
]
