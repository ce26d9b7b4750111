"""The native model and engine against `transformers` on the same weights."""

from __future__ import annotations

import os

import pytest
import torch

from sglang_reattn import Engine
from sglang_reattn.errors import ModelLoadError
from sglang_reattn.layers.attention import ForwardBatch, KVPool, PagedAttention
from sglang_reattn.models import loader
from sglang_reattn.models.rope import RopeTable
from sglang_reattn.testing import make_tiny_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "List three colors:",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _native_logits(model, cfg, ids: list[int], page_size: int = 16) -> torch.Tensor:
    """One full prefill through our model with the torch attention path."""
    n = len(ids)
    pages = list(range(1, (n + page_size - 1) // page_size + 1))
    pool = KVPool(cfg.num_layers, len(pages) + 1, page_size, cfg.num_kv_heads, cfg.head_dim,
                  torch.float32, torch.device("cpu"))
    rope = RopeTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, torch.device("cpu"))
    attn = PagedAttention(pool, rope, cfg.num_heads, cfg.head_dim, cfg.sliding_window)
    slots = torch.tensor([pages[i // page_size] * page_size + i % page_size for i in range(n)])
    batch = ForwardBatch(False, slots, torch.tensor([pages], dtype=torch.int32),
                         torch.tensor([n], dtype=torch.int32), torch.tensor([0, n]), n,
                         [pages], [n], [n])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), attn, batch))


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "smollm2"])
def test_tiny_model_matches_transformers(tmp_path, arch):
    path = make_tiny_model(str(tmp_path / arch), arch, seed=hash(arch) % 1000)
    hf = _hf(path)
    model, cfg = loader.load_model(path, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (150,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = _native_logits(model, cfg, ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    # Greedy decoding through the whole engine (paged cache, decode path) matches too.
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([ids[:40]]), max_new_tokens=24, do_sample=False,
                             min_new_tokens=24, pad_token_id=0)[0, 40:].tolist()
    with Engine(path, device="cpu", reattn_chunk_size=16, chunked_prefill_size=32,
                log_level="warning") as eng:
        out = eng.generate(input_ids=ids[:40],
                           sampling_params={"max_new_tokens": 24, "temperature": 0,
                                            "ignore_eos": True})
    assert out["output_ids"] == hf_out


def test_llama3_rope_scaling_changes_frequencies(tmp_path):
    from sglang_reattn.models.rope import inv_frequencies

    plain = inv_frequencies(64, 500000.0, None)
    scaled = inv_frequencies(64, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    assert torch.equal(plain[:4], scaled[:4])  # high frequencies untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # low ones divided by factor


@pytest.mark.slow
def test_default_model_greedy_matches_transformers(default_engine, default_model_dir):
    hf = _hf(default_model_dir)
    tok = default_engine.tokenizer
    outs = default_engine.generate(PROMPTS, {"max_new_tokens": 64, "temperature": 0,
                                             "min_new_tokens": 64})
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert out["output_ids"] == ref, prompt
    # Logits of prompt + generated continuation, position by position.
    model, cfg = default_engine.model, default_engine.model_config
    ids = tok.encode(PROMPTS[2]) + outs[2]["output_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_native_logits(model, cfg, ids, 64), ref, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_gguf_dequantization_matches_transformers_loader():
    from transformers import AutoModelForCausalLM

    gguf_path = loader.default_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).state_dict()
    _, ours = loader.read_gguf(gguf_path)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.norm.weight"):
        torch.testing.assert_close(ours[name], ref[name], atol=0, rtol=0)
    assert set(ours) == {k for k in ref if k != "lm_head.weight"}


def test_load_errors_are_clear(tmp_path):
    path = make_tiny_model(str(tmp_path / "m"), "llama")
    import json

    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    bad = tmp_path / "bad_arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        loader.load_model(str(bad), torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.resolve_model_path(str(tmp_path / "nope"))
    # A checkpoint whose tensors have the wrong shape names the tensor.
    from safetensors.torch import load_file, save_file

    shapes = tmp_path / "bad_shape"
    shapes.mkdir()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (shapes / "config.json").write_text(json.dumps(cfg))
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(shapes / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj.weight.*shape"):
        loader.load_model(str(shapes), torch.float32, torch.device("cpu"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(shapes / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing"):
        loader.load_model(str(shapes), torch.float32, torch.device("cpu"))
