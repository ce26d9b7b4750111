"""Helpers for tests and benchmarks: tiny random models of each architecture."""

from __future__ import annotations

import os
import shutil
from typing import Any

ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "llama3": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    },
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
    "smollm2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "tie_word_embeddings": True, "rope_theta": 100000.0},
}


def make_tiny_model(path: str, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                    **overrides: Any) -> str:
    """Write a random tiny HF model directory (config, safetensors, the default model's
    tokenizer) built by `transformers` itself, so it doubles as the reference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sglang_reattn.models.loader import resolve_model_path

    tok_src = resolve_model_path(None)
    base: dict[str, Any] = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 49152, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": dtype,
    }
    base.update(ARCH_CONFIGS[arch])
    base.update(overrides)
    model_type = base.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make the random weights large enough to give peaked logits
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    for f in os.listdir(tok_src):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tok_src, f), path)
    return path


def flip_kv_byte(store_path: str, chunk_id: str, layer: int) -> None:
    """Flip one byte in the middle of a stored chunk's KV block of one layer, behind the
    store's back (a corrupt block for tests)."""
    import lmdb

    env = lmdb.open(store_path, max_dbs=16)
    try:
        db = env.open_db(b"kv", create=False)
        with env.begin(write=True) as txn:
            key = bytes.fromhex(chunk_id) + layer.to_bytes(2, "big")
            val = bytearray(txn.get(key, db=db))
            val[len(val) // 2] ^= 0x5A
            txn.put(key, bytes(val), db=db)
    finally:
        env.close()
