"""Command line and process lifecycle of `launch_server`: flag errors, SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from sglang_reattn.server.args import build_parser, parse_args
from sglang_reattn.server.launcher import ServerProcess


def launch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_reattn.launch_server", *flags],
                          capture_output=True, text=True, timeout=120)


def test_flags_mirror_engine_args_and_sglang_defaults():
    args, opts = parse_args([])
    assert (args.host, args.port, args.model_path) == ("127.0.0.1", 30000, None)
    args, _ = parse_args(["--model-path", "m", "--reattn-chunk-size", "32",
                          "--disable-radix-cache", "--kv-store-path", "/tmp/s",
                          "--api-key", "k", "--context-length", "4096"])
    assert args.reattn_chunk_size == 32 and args.disable_radix_cache
    assert args.kv_store_path == "/tmp/s" and args.context_length == 4096
    text = build_parser().format_help()
    for flag in ("--tokenizer-path", "--dtype", "--device", "--max-running-requests",
                 "--chunked-prefill-size", "--mem-fraction-static", "--log-level",
                 "--served-model-name", "--random-seed", "--reattn-topk",
                 "--kv-store-capacity"):
        assert flag in text, flag


def test_unknown_flag_is_named():
    r = launch("--no-such-flag", "1")
    assert r.returncode == 2 and "--no-such-flag" in r.stderr


def test_abbreviated_flag_is_rejected():
    r = launch("--model", "x")  # argparse would otherwise take it for --model-path
    assert r.returncode == 2 and "--model" in r.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--chunked-prefill-size", "100"], "--chunked-prefill-size"),
    (["--dtype", "float8"], "--dtype"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    (["--port", "notaport"], "--port"),
])
def test_bad_values_are_named(flags, needle):
    r = launch(*flags)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sglang_reattn.testing import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama",
                           max_position_embeddings=8192)


def test_sigterm_finishes_or_aborts_in_flight(tiny_model):
    srv = ServerProcess(["--model-path", tiny_model, "--device", "cpu",
                         "--shutdown-timeout", "1"])
    try:
        results: dict[str, object] = {}
        first_chunk = threading.Event()

        def long_stream():
            events = []
            with requests.post(srv.url + "/generate", stream=True, timeout=120, json={
                    "text": "a long one", "stream": True,
                    "sampling_params": {"max_new_tokens": 8000, "ignore_eos": True}}) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        events.append(line[6:])
                        first_chunk.set()
            results["stream"] = events

        def short():
            r = requests.post(srv.url + "/generate", timeout=120, json={
                "text": "short", "sampling_params": {"max_new_tokens": 4}})
            results["short"] = r.json()

        t_long = threading.Thread(target=long_stream)
        t_long.start()
        assert first_chunk.wait(60)
        t_short = threading.Thread(target=short)
        t_short.start()
        time.sleep(0.2)
        started = time.time()
        code = srv.stop(timeout=60)
        t_long.join(30)
        t_short.join(30)
        assert time.time() - started < 30
        assert code in (0, -15), srv.output()
        events = results["stream"]
        assert events[-1] == b"[DONE]"
        last = json.loads(events[-2])
        assert last["meta_info"]["finish_reason"] == {"type": "abort"}
        assert results["short"]["meta_info"]["finish_reason"]["type"] == "length"
        assert "engine shut down" in srv.output()
    finally:
        srv.kill()
