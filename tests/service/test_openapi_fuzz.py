"""Schemathesis against the app's own OpenAPI document, every check it has, over the fake engine
and a real SQLite store: no request it generates, valid or not, gets a 5xx or an answer that the
document does not describe."""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from service.app import build_app
from service.auth import Authenticator
from service.store import Store
from tests.conftest import ADMIN_KEY, KEYS, auth, base_registry
from tests.fakes import FakeEngine


def _app(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("fuzz")
    store = Store(f"sqlite:///{data / 'prefloop.db'}")
    store.upgrade()
    return build_app(FakeEngine(), base_registry(store, data), Authenticator(KEYS))


# A schema-valid request may still be refused for what JSON Schema cannot say: a chat whose last
# message is the assistant's, `stream_options` without `stream`, a pairwise vote naming one answer
# twice (422), a prompt longer than the context (400). A schema-violating body may be refused for
# its size before anyone looks at it (413). Every other check keeps its defaults.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"]
            },
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "409", "413", "422", "429"]
            },
        }
    }
)


def test_api_conforms_to_its_openapi_document(tmp_path_factory):
    # Schemathesis' pytest plugin does not run under pytest 9, so its strategies are driven here.
    schema = schemathesis.openapi.from_asgi("/openapi.json", _app(tmp_path_factory), config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14

    for operation, mode in itertools.product(operations, list(GenerationMode)):
        # Negative cases need a body or a path to break: unknown query parameters are ignored,
        # as OpenAI's API and most HTTP APIs do, which the negative check counts as accepting.
        if mode is GenerationMode.NEGATIVE and not (operation.body or operation.path_parameters):
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        # The same cases on every run (a verdict that survives a rerun); a failure reproduces.
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case):
            # The admin key holds every scope, so every operation is reached past its auth check.
            case.call_and_validate(headers=auth(ADMIN_KEY))

        conforms()
