"""Shared fixtures: stores on SQLite and PostgreSQL, and the API over a fake engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from bench.training import byte_tokenizer
from service.app import build_app
from service.auth import Authenticator
from service.registry import Registry
from service.settings import ApiKey
from service.store import Store
from tests.fakes import FakeEngine

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CHAT_KEY = "sk-chat-0123456789abcdef"
OTHER_KEY = "sk-other-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"
READONLY_KEY = "sk-feedback-only-0123456789"
KEYS = [
    ApiKey(key=CHAT_KEY, name="app", scopes=["chat", "feedback"]),
    ApiKey(key=OTHER_KEY, name="other-app", scopes=["chat", "feedback"]),
    ApiKey(key=ADMIN_KEY, name="ops", scopes=["admin"]),
    ApiKey(key=READONLY_KEY, name="voter", scopes=["feedback"]),
]


def trained_result(tmp_path: Path, name: str, weight: float = 1.0) -> Path:
    """A folder shaped like a training result: merged weights plus the LoRA adapter."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "runs" / name
    (out / "weights").mkdir(parents=True)
    (out / "adapter").mkdir()
    save_file({"w": torch.full((4, 4), weight)}, str(out / "weights" / "model.safetensors"))
    save_file({"lora_A": torch.zeros(2, 4)}, str(out / "adapter" / "adapter_model.safetensors"))
    (out / "weights" / "config.json").write_text("{}")
    return out


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"prefloop_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'prefloop.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url)
    s.upgrade()
    yield s
    s.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def base_registry(store: Store, data_dir: Path) -> Registry:
    """A registry in `data_dir` serving a stand-in base model."""
    base = data_dir / "models" / "base-model"
    base.mkdir(parents=True)
    # The files a cycle checks for before it starts (`training.cycle.check_model_files`).
    for name in ("config.json", "tokenizer_config.json"):
        (base / name).write_text("{}")
    (base / "model.safetensors").write_bytes(b"")
    reg = Registry(store, data_dir)
    reg.ensure_base(base)
    return reg


@pytest.fixture
def registry(store: Store, tmp_path) -> Registry:
    return base_registry(store, tmp_path)


@pytest.fixture
async def client(engine: FakeEngine, registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(engine, registry, Authenticator(KEYS))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.headers.update(auth(CHAT_KEY))
        yield c


# Tiny models: a random-weight 2-layer Llama (hidden 64) with a byte-level tokenizer (256 byte
# tokens + 3 specials) and a ChatML chat template, built from code; nothing is read from a model
# hub or the embedded model folder, and building both takes well under a second.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF folder (safetensors, float32, tied embeddings) like the embedded model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)  # float32, torch's default
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama under a random one-label scalar head, saved with its tokenizer: a reward
    model (and the value model PPO starts from) for the PPO loop and the gate."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-reward")
    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path
