"""The engine's Triton path (the GPU path's attention kernels and KV store) gives the same
greedy tokens as its torch path. Run under TRITON_INTERPRET=1 in a subprocess, since the
interpreter must be chosen before triton is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from sglang_reattn import Engine, kernels
    path = sys.argv[1]
    eng = Engine(path, device="cpu", reattn_chunk_size=16, chunked_prefill_size=32,
                 log_level="warning")
    g = torch.Generator().manual_seed(0)
    # The third prompt is 2x the tiny model's trained length: ReAttention selects chunks.
    prompts = [list(range(100, 160)), list(range(7, 30)),
               torch.randint(3, 49152, (1100,), generator=g).tolist()]
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    ref = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
    assert eng.flush_cache()
    eng.attn.use_triton, eng.attn._kernels = True, kernels
    out = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
    eng.shutdown()
    print("REF", ref)
    print("OUT", out)
    sys.exit(0 if out == ref else 1)
""")


def test_triton_path_matches_torch_path(tiny_llama):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_llama], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
