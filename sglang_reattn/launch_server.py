"""`python -m sglang_reattn.launch_server [SGLang-style flags]`: the HTTP server.

Loads the engine, then serves it with uvicorn on --host/--port (loopback by default).
SIGTERM / SIGINT: the listening socket closes, in-flight requests get
--shutdown-timeout seconds to finish and are then aborted (their outputs end with
finish_reason {"type": "abort"}), and the engine shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from sglang_reattn.config import EngineArgs
from sglang_reattn.errors import InvalidArgument, ModelLoadError, ReAttnError
from sglang_reattn.kv_store import StoreError
from sglang_reattn.server.args import ServerOptions, parse_args

logger = logging.getLogger("sglang_reattn.server")


class _Server(uvicorn.Server):
    """uvicorn, plus: on the first signal, start draining the runner (abort after the
    timeout) so long streams cannot hold the shutdown forever."""

    def __init__(self, config: uvicorn.Config, runner: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self._runner = runner
        self._drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon_threadsafe(self._runner.begin_drain, self._drain_timeout)


def serve(engine: Any, engine_args: EngineArgs, opts: ServerOptions) -> None:
    """Serve an already built engine until a signal; shuts the engine down at the end."""
    from sglang_reattn.server.app import create_app

    app = create_app(engine, engine_args, opts)
    config = uvicorn.Config(
        app, host=engine_args.host, port=engine_args.port,
        log_level=engine_args.log_level, access_log=engine_args.log_level == "debug",
        timeout_graceful_shutdown=opts.shutdown_timeout + 10,  # backstop of the drain
        timeout_keep_alive=5,
    )
    server = _Server(config, app.state.server.runner, opts.shutdown_timeout)
    logger.info("serving %s on http://%s:%d", app.state.server.model_name,
                engine_args.host, engine_args.port)
    server.run()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        engine_args, opts = parse_args(argv)
    except InvalidArgument as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=engine_args.log_level.upper() if engine_args.log_level != "trace"
                        else "DEBUG", format="[%(asctime)s %(name)s] %(message)s")
    from sglang_reattn import Engine

    options = {k: v for k, v in engine_args.to_dict().items() if k != "model_path"}
    try:
        engine = Engine(engine_args.model_path, **options)
    except ModelLoadError as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 1
    except ReAttnError as e:  # a bad option only the engine can check (no CUDA, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:  # the disk tier: another model's store, no store to read, ...
        print(f"error: disk tier: {e} (--kv-store-path, or --disable-kv-store)",
              file=sys.stderr)
        return 2
    serve(engine, engine_args, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
