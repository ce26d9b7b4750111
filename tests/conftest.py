from __future__ import annotations

import os

import pytest

# Tests run on the CPU, single-threaded BLAS keeps results reproducible and fast on 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_engine():
    from sglang_reattn import Engine

    eng = Engine(device="cpu", log_level="warning")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def default_model_dir():
    from sglang_reattn.models.loader import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from sglang_reattn.testing import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")
