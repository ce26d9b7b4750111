"""Fork server for tests that start many servers: imports launch_server's heavy modules
once, then forks one child per request that runs `launch_server.main(argv)` exactly as
`python -m sglang_reattn.launch_server` would (its own process, its own engine, store and
sockets; nothing is opened before the fork). Saves the ~3 s of imports per start.

Protocol: one JSON object per stdin line, {"argv": [...], "log": path, "env": {...}}
(env: variables to set, or to unset with null); answers one line {"pid": N}. Children
are reaped automatically. EOF (the test process ended, even by a crash) SIGKILLs the
children still running and ends the zygote: no server outlives the tests.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _preload() -> None:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401 - nn init on the meta device imports it (1.7 s)
    import transformers  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    import sglang_reattn.engine.engine
    import sglang_reattn.engine.store_tier
    import sglang_reattn.launch_server
    import sglang_reattn.server.app  # noqa: F401


def _child(argv: list[str], log: str, env: dict[str, str]) -> None:
    os.setpgrp()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for key, value in env.items():  # None: unset
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        from sglang_reattn.launch_server import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the log
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    print(json.dumps({"ready": True}), flush=True)
    children = []
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            _child(req["argv"], req["log"], req.get("env", {}))
        children.append(pid)
        print(json.dumps({"pid": pid}), flush=True)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass


if __name__ == "__main__":
    main()
