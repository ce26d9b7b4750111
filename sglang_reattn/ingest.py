"""Prefill a document into the KV store and name it.

  python -m sglang_reattn.ingest [--model-path ...] [--kv-store-path DIR] FILE --name NAME

Takes the same model and engine flags as launch_server, and uses the same store by
default (--kv-store-path auto: the model's directory under the user's cache), so a server
started with the same model and flags finds the context. The document is prefilled piece
by piece (each piece reuses everything before it from the prefix cache), its completed
chunks are written into the store, and the chain is recorded as a named context, so later
requests, server runs and processes reuse it instead of recomputing it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from sglang_reattn.errors import ReAttnError


def build_parser() -> argparse.ArgumentParser:
    from sglang_reattn.server.args import add_engine_args

    p = argparse.ArgumentParser(prog="python -m sglang_reattn.ingest", allow_abbrev=False,
                                description=__doc__.splitlines()[0])
    p.add_argument("file", help="text file to ingest ('-' for standard input)")
    p.add_argument("--name", required=True, help="name of the context")
    p.add_argument("--namespace", default="", help="cache salt / extra_key of the context")
    p.add_argument("--pin", action="store_true", help="pin the context against eviction")
    add_engine_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from sglang_reattn.engine.engine import Engine
    from sglang_reattn.server.args import engine_args_from

    ns = build_parser().parse_args(argv)
    try:
        args = engine_args_from(ns)
    except ReAttnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.store_path is None:
        print("error: ingest writes into the disk tier; drop --disable-kv-store", file=sys.stderr)
        return 2
    if args.kv_store_readonly:
        print("error: ingest writes into the disk tier; drop --kv-store-readonly",
              file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if ns.file == "-" else open(ns.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {ns.file}: {e}", file=sys.stderr)
        return 2
    opts = args.to_dict()
    with Engine(opts.pop("model_path"), **opts) as eng:
        n_tokens = len(eng.tokenizer.encode(text))
        t0 = time.perf_counter()
        try:
            with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=ns.name) as bar:
                info = eng.ingest(ns.name, text=text, namespace=ns.namespace, pin=ns.pin,
                                  progress=bar.update)
        except ReAttnError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dt = time.perf_counter() - t0
        print(f"ingested {ns.name!r}: {n_tokens} tokens ({info['stored_tokens']} in full chunks "
              f"stored) in {dt:.1f}s, {n_tokens / dt:.0f} tok/s, store {eng.kv_store_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
