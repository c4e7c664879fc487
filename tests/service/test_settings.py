"""Settings: sources and their order, validation messages that name the setting, key handling."""

from __future__ import annotations

import json

import pytest

from service.app import AppOptions
from service.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for name in list(os.environ):
        if name.startswith("PREFLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(tmp_path / "data"))


def test_defaults_derive_from_data_dir(tmp_path):
    s = load_settings()
    assert s.resolved_model_path == tmp_path / "data" / "models" / "SmolLM2-135M-Instruct"
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'prefloop.db'}"
    assert s.engine.enable_chunked_prefill is None


def test_app_options_default_to_the_settings_defaults():
    assert AppOptions() == AppOptions.from_settings(load_settings())
    config = load_settings().model_copy(update={"feedback_batch_max": 7, "swap_poll_s": 2.0})
    options = AppOptions.from_settings(config, echo_request_id=False)
    assert (options.feedback_batch_max, options.swap_poll_s) == (7, 2.0)
    assert not options.echo_request_id


def test_env_overrides_config_file(monkeypatch, tmp_path):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text("port: 9000\nreplicas: 3\nengine:\n  max_num_seqs: 8\n")
    monkeypatch.setenv("PREFLOOP_CONFIG", str(cfg))
    monkeypatch.setenv("PREFLOOP_PORT", "9100")
    monkeypatch.setenv("PREFLOOP_ENGINE__MAX_MODEL_LEN", "1024")
    s = load_settings()
    assert (s.port, s.replicas) == (9100, 3)
    assert (s.engine.max_num_seqs, s.engine.max_model_len) == (8, 1024)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PREFLOOP_PORT": "70000"}, "PREFLOOP_PORT="),
        ({"PREFLOOP_REPLICAS": "zero"}, "PREFLOOP_REPLICAS="),
        ({"PREFLOOP_DATABASE_URL": "mysql://x"}, "PREFLOOP_DATABASE_URL="),
        ({"PREFLOOP_ENGINE__DTYPE": "int3"}, "PREFLOOP_ENGINE__DTYPE="),
        ({"PREFLOOP_ENGINE__MAX_NUM_BATCHED_TOKENS": "512"}, "max_num_batched_tokens"),
        ({"PREFLOOP_NO_SUCH_THING": "1"}, "PREFLOOP_NO_SUCH_THING="),
        ({"PREFLOOP_API_KEYS": '[{"key": "short"}]'}, "PREFLOOP_API_KEYS__0__KEY="),
    ],
)
def test_invalid_settings_name_the_setting(monkeypatch, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert named in str(exc.value)


def test_unknown_config_file_key_is_named(monkeypatch, tmp_path):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text("port: 9000\nprot: 9001\ntrain:\n  beta: 0.2\n")
    monkeypatch.setenv("PREFLOOP_CONFIG", str(cfg))
    monkeypatch.setenv("PREFLOOP_TRAIN__EPOCHS", "3")
    with pytest.raises(SettingsError, match="prot") as exc:
        load_settings()
    assert "train" not in str(exc.value) and "EPOCHS" not in str(exc.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("engine:\n  max_num_seqz: 3\n", "engine.max_num_seqz"),
        ("autoscaling:\n  enabled: true\n  max_replica: 2\n", "autoscaling.max_replica"),
        ("port: 9000\nengine:\n  max_num_seqs: 8\n  dtyp: float32\n", "engine.dtyp"),
    ],
)
def test_unknown_nested_config_file_key_is_named(monkeypatch, tmp_path, text, named):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text(text)
    monkeypatch.setenv("PREFLOOP_CONFIG", str(cfg))
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert str(exc.value) == f"unknown settings: {cfg}: {named} (see README, Configuration)"


def test_unknown_key_in_a_section_given_whole_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("PREFLOOP_ENGINE", json.dumps({"max_num_seqz": 3}))
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert "PREFLOOP_ENGINE__MAX_NUM_SEQZ=3: Extra inputs are not permitted" in str(exc.value)


def test_config_file_that_is_not_a_mapping_is_named(monkeypatch, tmp_path):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text("- port: 9000\n")
    monkeypatch.setenv("PREFLOOP_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match=r"PREFLOOP_CONFIG=.*a mapping of settings"):
        load_settings()


def test_missing_config_file_is_named(monkeypatch):
    monkeypatch.setenv("PREFLOOP_CONFIG", "/nonexistent/prefloop.yaml")
    with pytest.raises(SettingsError, match="PREFLOOP_CONFIG"):
        load_settings()


def test_keys_from_env_and_file(monkeypatch, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- key: sk-from-file-0123456789\n  name: ops\n  scopes: [admin]\n")
    monkeypatch.setenv("PREFLOOP_API_KEYS", json.dumps([{"key": "sk-from-env-0123456789"}]))
    monkeypatch.setenv("PREFLOOP_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("PREFLOOP_HOST", "0.0.0.0")
    s = load_settings()
    names = [(k.name, k.scopes) for k in s.all_api_keys]
    assert names[1] == ("ops", ["admin"])
    assert names[0][0].startswith("key-") and names[0][1] == ["chat", "feedback"]
    assert s.auth_enabled and s.bind_host == "0.0.0.0"
    assert "sk-from-env" not in repr(s)


def test_without_keys_binds_loopback_only(monkeypatch):
    monkeypatch.setenv("PREFLOOP_HOST", "0.0.0.0")
    s = load_settings()
    assert not s.auth_enabled and s.bind_host == "127.0.0.1"


def test_limits_section_from_env_and_misspelt_limit_refused(monkeypatch):
    monkeypatch.setenv("PREFLOOP_LIMITS__REQUESTS_PER_S", "5")
    monkeypatch.setenv("PREFLOOP_LIMITS__MAX_BODY_BYTES", "65536")
    s = load_settings()
    assert (s.limits.requests_per_s, s.limits.max_body_bytes) == (5, 65536)
    assert s.limits.max_admitted_chats is None  # 2 x engine.max_num_seqs, in the app
    monkeypatch.setenv("PREFLOOP_LIMITS__REQUEST_PER_S", "5")
    with pytest.raises(SettingsError, match="PREFLOOP_LIMITS__REQUEST_PER_S"):
        load_settings()
