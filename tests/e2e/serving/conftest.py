"""One deployment of the service for every test of this package: serving through the OpenAI
client and the faults (kills, floods, oversized bodies) it must survive, which leave it serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Service, running_service


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory, data_dir=tmp_path_factory.mktemp("data")) as svc:
        yield svc
