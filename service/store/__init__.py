"""The system of record: generations and feedback (SQLAlchemy 2, Alembic migrations)."""

from service.store.schema import Feedback, Generation, GenerationChoice
from service.store.store import Store
from service.store.writer import GroupCommitWriter

__all__ = ["Feedback", "Generation", "GenerationChoice", "GroupCommitWriter", "Store"]
