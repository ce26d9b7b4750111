from __future__ import annotations

import os

import pytest

# Tests run on the CPU, single-threaded BLAS keeps results reproducible and fast on 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The converted default model stays in the user's cache (it is what install.sh made);
# everything else cached under XDG_CACHE_HOME, such as launch_server's default disk tier,
# goes to a temporary directory per test module (the fixture below).
if not os.environ.get("SGLANG_REATTN_CACHE_DIR"):
    from sglang_reattn.models.loader import cache_dir

    os.environ["SGLANG_REATTN_CACHE_DIR"] = cache_dir()


@pytest.fixture(autouse=True, scope="module")
def private_cache_home(tmp_path_factory):
    """XDG_CACHE_HOME of this module's tests and of the servers they start: the default
    disk tier (--kv-store-path auto) never lands in the user's cache, and no module sees
    another module's stored chunks."""
    path = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


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


@pytest.fixture
def synthetic_store_tier(tmp_path):
    """Factory: make(num_layers, pool_pages, n_chunks, seed) -> (StoreTier over a fresh raw
    store holding a synthetic chain of n_chunks, its ids). Shapes: 2 KV heads of dim 8,
    chunks of 4 tokens, fp16; the tier's pool has num_layers layers of pool_pages pages."""
    import torch

    from sglang_reattn.engine.store_tier import StoreTier
    from sglang_reattn.kv_store import synthetic
    from sglang_reattn.layers.attention import KVPool

    made = []

    def make(num_layers: int, pool_pages: int, n_chunks: int, seed: int):
        fp = synthetic.tiny_fingerprint(num_layers=num_layers, num_kv_heads=2, head_dim=8,
                                        chunk_size=4)
        pool = KVPool(num_layers, pool_pages, 4, 2, 8, torch.float16, torch.device("cpu"))
        tier = StoreTier(str(tmp_path / f"s{len(made)}"), fp, "64MiB", "raw", pool,
                         lambda p: None)
        made.append(tier)
        recs = synthetic.make_chain(fp, n_chunks, seed=seed)
        tier.store.put_chunks(recs)
        return tier, [r.chunk_id for r in recs]

    yield make
    for tier in made:
        tier.close()
