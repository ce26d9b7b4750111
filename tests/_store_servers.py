"""Helpers of the server-level disk-tier tests: tiny-model servers started in the
background (forked from a zygote that has the heavy modules imported, see
_server_zygote.py), a whole-store consistency check through the kv_store API, metrics."""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import requests
import torch
from sglang_reattn.kv_store import ChunkStore, chunk_id

from sglang_reattn.server.launcher import free_port

C = 16  # tokens per chunk: small chunks, many LMDB transactions
TINY_FLAGS = ["--device", "cpu", "--reattn-chunk-size", str(C), "--chunked-prefill-size", "64",
              "--max-total-tokens", "32768", "--log-level", "warning"]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}

_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="server-start")
_zygote_lock = threading.Lock()
_zygote: subprocess.Popen | None = None
_started: list[Server] = []


def _fork(argv: list[str], log: str, env: dict[str, str | None]) -> int:
    """A new launch_server process, forked by the zygote; returns its pid."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.poll() is not None:
            _zygote = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(__file__), "_server_zygote.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
            atexit.register(_zygote.stdin.close)
            assert json.loads(_zygote.stdout.readline())["ready"]
        _zygote.stdin.write(json.dumps({"argv": argv, "log": log, "env": env}) + "\n")
        _zygote.stdin.flush()
        return json.loads(_zygote.stdout.readline())["pid"]


class Server:
    """A launch_server process on a free loopback port (like launcher.ServerProcess)."""

    def __init__(self, flags: list[str], env: dict[str, str | None], timeout: float = 120
                 ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang_reattn_server_",
                                               suffix=".log", delete=False)
        argv = ["--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.pid = _fork(argv, self.log.name, env)
        _started.append(self)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while self.alive():
            if time.time() > deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(30)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (graceful: in-flight requests finish, the store is closed) and wait."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            if not self._wait_gone(timeout):
                self.kill()


def ids(n: int, seed: int) -> list[int]:
    """n random token ids (no special tokens), the same for a seed in every process."""
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start(model: str, *flags: str, env: dict[str, str | None] | None = None) -> Future:
    """A tiny-model server starting in the background; `.result()` waits until ready.
    It gets this process's XDG_CACHE_HOME and HOME as they are now (the test module's
    private cache, see conftest), updated by `env` (None unsets a variable). One torch
    thread per server keeps the 2-core machine from oversubscribing."""
    env = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "HOME")} | (env or {})
    return _pool.submit(Server, ["--model-path", model, *TINY_FLAGS, *flags], env)


def discard_all() -> None:
    """SIGKILL every server started here that still runs (cleanup after a failure)."""
    while _started:
        discard(_started.pop(), kill=True)


def discard(srv: Server, kill: bool = False) -> None:
    """SIGKILL or SIGTERM a server and remove its log."""
    if kill:
        srv.kill()
    else:
        srv.stop()
    try:
        os.unlink(srv.log.name)
    except OSError:
        pass


def generate(srv: Server, timeout: float = 120, **body) -> dict:
    r = requests.post(srv.url + "/generate", json={"sampling_params": GREEDY, **body},
                      timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def metric(srv: Server, name: str) -> float:
    """A `sglang_reattn:<name>` gauge of the server's /metrics."""
    text = requests.get(srv.url + "/metrics", timeout=30).text
    m = re.search(rf"^sglang_reattn:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert m, f"no sglang_reattn:{name} in /metrics"
    return float(m.group(1))


def check_store(path: str, capacity: int | None = None) -> dict[str, int]:
    """Open the store read-only and read every chunk back through the kv_store API: each
    block passes its checksum, every visible chunk is whole (header, all layers' blocks,
    summary, consistent indexes), ids match tokens and parents. Returns counts."""
    with ChunkStore(path, None, readonly=True) as s:
        heads = {h.chunk_id: h for h in s.iter_headers()}  # CRC-checked headers
        order = sorted(heads)
        for layer in range(s.num_layers):
            for i in range(0, len(order), 512):
                k, v = s.get_kv_many(order[i:i + 512], layer)  # CRC-checked blocks
                assert np.isfinite(k.astype(np.float32)).all()
                assert np.isfinite(v.astype(np.float32)).all()
        if order:
            summ = s.get_summaries(order)  # CRC-checked summaries
            assert summ.shape[:2] == (len(order), s.num_layers)
        for h in heads.values():
            assert len(h.token_ids) == s.chunk_size
            assert h.parent_id is None or h.parent_id in heads, "orphan chunk"
            assert chunk_id(h.token_ids, h.parent_id, h.namespace) == h.chunk_id
        st = s.stats()  # one snapshot: nothing is half written
        dbs = st["dbs"]
        assert st["chunks"] == len(heads)
        assert dbs["kv"]["entries"] == s.num_layers * len(heads), "missing or orphan KV blocks"
        assert dbs["summaries"]["entries"] == len(heads), "missing or orphan summaries"
        assert dbs["lru"]["entries"] == sum(h.pin_count == 0 for h in heads.values())
        assert dbs["children"]["entries"] == sum(h.parent_id is not None for h in heads.values())
        assert st["bytes"] == sum(h.stored_bytes for h in heads.values())
        if capacity is not None:
            assert st["bytes"] <= capacity
        contexts = s.list_contexts()
        for ctx in contexts:
            assert ctx.last_chunk_id is None or ctx.last_chunk_id in heads
        return {"chunks": len(heads), "bytes": st["bytes"], "contexts": len(contexts)}
