"""The model registry: versions with manifests and checksums, and the serving history.

A version lives in `<data_dir>/versions/<id>/`: `weights/` (full safetensors weights vLLM loads),
`adapter/` for a LoRA version (what training produced; the weights are the parent's with it
merged), and `manifest.json` (parent, algorithm, config, snapshot, metrics, sha256 of every file).
A reward model (kind `reward`, RLHF's scorer) is a version too, so it has the same provenance, but
it scores answers and is never served: `promote` refuses it and `latest_reward` finds it.
Paths in the database are relative to the data directory, so replicas that mount the directory
elsewhere (a shared volume on a cluster) agree. The newest `Promotion` row names the version every
replica serves; promoting and rolling back both append one.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import desc, select

from service.checksums import file_checksums
from service.errors import Conflict, NotFound
from service.store import ModelVersion, Promotion, Store

BASE_VERSION = "base"
REWARD_KIND = "reward"
MANIFEST = "manifest.json"
# What transformers and vLLM read from a weights folder (besides its safetensors) and a LoRA folder.
WEIGHTS_FILES = ("config.json", "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Served:
    version: ModelVersion
    promotion_id: int
    weights_path: Path


def new_version_id() -> str:
    return f"v{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class Registry:
    def __init__(self, store: Store, data_dir: Path):
        self.store = store
        self.data_dir = Path(data_dir)

    def path_of(self, version: ModelVersion) -> Path:
        return self.data_dir / version.path

    def adapter_path(self, version: ModelVersion) -> Path | None:
        return self.path_of(version) / "adapter" if version.kind == "lora" else None

    def weights_path(self, version: ModelVersion) -> Path:
        root = self.path_of(version)
        return root if version.kind == BASE_VERSION else root / "weights"

    def tokenizer_path(self) -> Path:
        """The tokenizer every version uses: the base version's, where it was registered."""
        return self.weights_path(self.get(BASE_VERSION))

    def missing_files(self, version: ModelVersion) -> list[str]:
        """What loading `version` needs and its folder lacks: the whole folder, or its
        `config.json`, a `*.safetensors` file, the tokenizer (saved with every version's weights)
        and, for a LoRA version, its adapter's two files."""
        weights = self.weights_path(version)
        if not weights.is_dir():
            return [f"{weights} (the folder)"]
        missing = [str(weights / name) for name in WEIGHTS_FILES if not (weights / name).is_file()]
        if not any(weights.glob("*.safetensors")):
            missing.append(str(weights / "*.safetensors"))
        adapter = self.adapter_path(version)
        if adapter is not None:
            missing += [
                str(adapter / name) for name in ADAPTER_FILES if not (adapter / name).is_file()
            ]
        return missing

    def ensure_base(self, model_path: Path) -> None:
        """Register the base model as version `base` and serve it if nothing was promoted yet."""

        def op(session) -> None:
            if session.get(ModelVersion, BASE_VERSION) is None:
                rel = _relative(Path(model_path), self.data_dir)
                session.add(
                    ModelVersion(
                        id=BASE_VERSION,
                        parent_id=None,
                        kind=BASE_VERSION,
                        weights_id=BASE_VERSION,
                        path=rel,
                        algorithm=None,
                        snapshot_id=None,
                        status="approved",
                        reason=None,
                        manifest={"id": BASE_VERSION, "source": str(model_path)},
                        metrics={},
                        created_at=datetime.now(UTC),
                    )
                )
                session.flush()
            if session.scalars(select(Promotion).limit(1)).first() is None:
                session.add(
                    Promotion(
                        version_id=BASE_VERSION,
                        action="promote",
                        actor="bootstrap",
                        created_at=datetime.now(UTC),
                    )
                )

        self.store.write_one(op)

    def publish(
        self,
        *,
        version_id: str,
        parent: ModelVersion,
        source: Path,
        kind: str,
        weights_id: str | None = None,
        algorithm: str,
        snapshot_id: str | None,
        config: dict,
        metrics: dict,
    ) -> ModelVersion:
        """Move a trained result (`source` holds `weights/` and, for LoRA, `adapter/`) into the
        registry, write its manifest and record it as a candidate. `weights_id`: for a LoRA, the
        version whose full weights the adapter applies to."""
        target = self.data_dir / "versions" / version_id
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
        files = file_checksums(target, skip=frozenset({MANIFEST}))
        manifest = {
            "id": version_id,
            "parent": parent.id,
            "kind": kind,
            "weights_id": weights_id or version_id,
            "algorithm": algorithm,
            "snapshot_id": snapshot_id,
            "config": config,
            "metrics": metrics,
            "created_at": datetime.now(UTC).isoformat(),
            "files": files,
        }
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        row = ModelVersion(
            id=version_id,
            parent_id=parent.id,
            kind=kind,
            weights_id=weights_id or version_id,
            path=_relative(target, self.data_dir),
            algorithm=algorithm,
            snapshot_id=snapshot_id,
            status="candidate",
            reason=None,
            manifest=manifest,
            metrics=metrics,
            created_at=datetime.now(UTC),
        )

        def op(session) -> ModelVersion:
            session.add(row)
            return row

        return self.store.write_one(op)

    def checksum_mismatches(self, version: ModelVersion) -> list[str]:
        """Files whose bytes differ from the manifest, or that are missing or unexpected."""
        recorded = version.manifest.get("files", {})
        actual = file_checksums(self.path_of(version), skip=frozenset({MANIFEST}))
        return sorted(
            name
            for name in set(recorded) | set(actual)
            if recorded.get(name, {}).get("sha256") != actual.get(name, {}).get("sha256")
        )

    def judge(self, version_id: str, *, approved: bool, reason: str | None, metrics: dict) -> None:
        """Record the gate's verdict; a rejected version is kept but can never be served."""

        def op(session) -> None:
            row = session.get(ModelVersion, version_id)
            row.status = "approved" if approved else "rejected"
            row.reason = reason
            row.metrics = {**row.metrics, "gate": metrics}

        self.store.write_one(op)

    def get(self, version_id: str, *, param: str = "version_id") -> ModelVersion:
        """The version `version_id`; `param` is the request field a 404 names."""
        with self.store.reading() as session:
            row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFound(
                f"no model version {version_id!r}", param=param, code="version_not_found"
            )
        return row

    def latest_reward(self) -> ModelVersion:
        """The newest approved reward model."""
        with self.store.reading() as session:
            row = session.scalars(
                select(ModelVersion)
                .where(ModelVersion.kind == REWARD_KIND, ModelVersion.status == "approved")
                .order_by(desc(ModelVersion.created_at), desc(ModelVersion.id))
                .limit(1)
            ).first()
        if row is None:
            raise NotFound(
                "no approved reward model yet; one is trained by a cycle with train.algorithm rlhf",
                code="no_reward_model",
            )
        return row

    def versions(self) -> list[ModelVersion]:
        with self.store.reading() as session:
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)))

    def history(self, limit: int = 20) -> list[Promotion]:
        with self.store.reading() as session:
            return list(
                session.scalars(select(Promotion).order_by(desc(Promotion.id)).limit(limit))
            )

    def served(self) -> Served:
        with self.store.reading() as session:
            promo = session.scalars(select(Promotion).order_by(desc(Promotion.id)).limit(1)).first()
            if promo is None:
                raise NotFound("nothing has been promoted yet", code="no_served_version")
            version = session.get(ModelVersion, promo.version_id)
        assert version is not None  # promotions reference versions (foreign key)
        return Served(version, promo.id, self.weights_path(version))

    def promote(self, version_id: str, actor: str) -> Promotion:
        """Serve `version_id` everywhere. Serving it again after another is a rollback. Only
        approved chat models (never a reward model) can be served, so `served` never names one."""

        def op(session) -> Promotion:
            version = session.get(ModelVersion, version_id)
            if version is None:
                raise NotFound(
                    f"no model version {version_id!r}", param="version_id", code="version_not_found"
                )
            if version.kind == REWARD_KIND:
                # Checked before the status: an approved reward model is still not a chat model.
                raise Conflict(
                    f"version {version_id!r} is a reward model: reward models score answers "
                    "and are never served",
                    param="version_id",
                    code="not_a_chat_model",
                )
            if version.status != "approved":
                raise Conflict(
                    f"version {version_id!r} is {version.status}"
                    + (f" ({version.reason})" if version.reason else "")
                    + "; only versions that passed the gate can be served",
                    param="version_id",
                    code="version_not_approved",
                )
            current = session.scalars(
                select(Promotion).order_by(desc(Promotion.id)).limit(1)
            ).first()
            if current is not None and current.version_id == version_id:
                return current
            served_before = session.scalars(
                select(Promotion).where(Promotion.version_id == version_id).limit(1)
            ).first()
            promo = Promotion(
                version_id=version_id,
                actor=actor,
                created_at=datetime.now(UTC),
                action="rollback" if served_before is not None else "promote",
            )
            session.add(promo)
            session.flush()
            return promo

        return self.store.write_one(op)


def _relative(path: Path, root: Path) -> str:
    """Inside the data directory: relative to it; elsewhere (a model mounted apart): absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)
