"""One deployment for the loop's tests (DPO/KTO and RLHF cycles over HTTP, swaps under load), with
a data directory of its own where the cycles publish their versions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.settings import EngineSettings
from tests.e2e.conftest import Service, running_service


@pytest.fixture(scope="package")
def loop_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(
        tmp_path_factory,
        data_dir=tmp_path_factory.mktemp("loop-data"),
        engine=EngineSettings(kv_cache_space_gib=1, max_num_seqs=16),
    ) as svc:
        yield svc
