"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5) in plain torch.

Read top to bottom:
  1. ModelArgs        - the config, read from / written to Hugging Face config.json (old and transformers-5 styles)
  2. the modules      - RMSNorm (fp32 math like HF), RoPE (HF rotate_half, no q/k permutation), GQA attention,
                        SwiGLU MLP, decoder block, Transformer with HF parameter names
  3. attention        - attention.py: the plans a forward attends with (causal, mask, per_doc, varlen, flex)
  4. HF I/O           - from_pretrained / load_hf_weights / save_pretrained (safetensors, sharded or not)
  5. decoding         - the cache protocol Transformer.forward uses (decode.py holds the static cache and the
                        continuously batched decoder)

Module and parameter names equal the Hugging Face ones (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `lm_head`), so `state_dict()` keys equal the keys of HF safetensors files and no key mapping is needed.
RoPE uses the HF `rotate_half` convention, so q/k weights are loaded as they are (no permutation).

Packed rows and the `attn_impl` choices (per_doc, varlen, flex, auto) are described in attention.py.

Random-init models of these architectures for tests and the demo: `python maketiny.py --out DIR --arch qwen2`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import (
    ATTN_IMPLS,
    PACKED_PLANS,
    AttnPlan,
    attend,
    attend_packed,
    make_attn_plan,
    varlen_available,
)
from cli import UserError, write_json

# model_type -> HF architecture class name. The only types this decoder implements.
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
CONFIG_NAME, INDEX_NAME, SINGLE_WEIGHTS_NAME = "config.json", "model.safetensors.index.json", "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(name: str, device_type: str) -> torch.dtype:
    """auto: bfloat16 on GPU, float32 on CPU; else a name of DTYPES (float32/fp32, bfloat16/bf16, float16/fp16)."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------------------------
# 1. config


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections (qwen2: always True)
    o_bias: bool = False  # o_proj (llama attention_bias)
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral v0.1; enforced as "sequence must fit in the window"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's stored dtype (config torch_dtype / dtype)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf_config(cls, d: dict) -> ModelArgs:
        """Reads a HF config.json dict: old style (rope_theta, rope_scaling{rope_type|type}, torch_dtype) and
        transformers-5 style (rope_parameters{rope_type, rope_theta, ...}, dtype)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} (architectures={d.get('architectures')}); "
                             f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' (SwiGLU) is implemented")
        if mt == "qwen2" and d.get("use_sliding_window", False):
            raise ValueError("qwen2 config has use_sliding_window=true; sliding-window attention is not implemented")
        rp = d.get("rope_parameters") or {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 1e4)}
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        scaling = None
        if rope_type != "default":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {"rope_type": rope_type, **{k: rp[k] for k in keys if k in rp}}
        sliding = d.get("sliding_window") if mt == "mistral" else None
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rp.get("rope_theta", 1e4)), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)) if mt == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            sliding_window=sliding, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )

    def to_hf_config(self) -> dict:
        """A config.json dict in the classic style (rope_theta/rope_scaling/torch_dtype) that transformers 4.4x
        and 5.x both read."""
        d = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02, "use_cache": True,
        }
        if self.model_type == "llama":
            d |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
            if self.qkv_bias != self.o_bias:
                raise ValueError("llama's attention_bias covers q/k/v and o together; qkv_bias != o_bias")
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_hidden_layers}
        return d


# --------------------------------------------------------------------------------------------------------------
# 2. modules


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale (in the input dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, exactly as transformers computes them (default and llama3)."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    sc = args.rope_scaling
    if not sc or sc.get("rope_type", "default") == "default":
        return inv
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, inv_l)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


SMALL_M = 64  # rows up to which `linear` computes W @ x^T on CPU (decode steps)


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x), except for a plain nn.Linear on CPU without autograd and 2..SMALL_M rows (a decode step): there
    MKL's sgemm is 1.2-4x faster as W @ x^T than as x @ W^T (measured on the dev machine for the Qwen2.5-0.5B
    shapes, with bitwise-equal results; docs/benchmarks.md, "Decoding")."""
    if type(mod) is not nn.Linear or x.device.type != "cpu" or torch.is_grad_enabled():
        return mod(x)
    x2 = x.reshape(-1, x.shape[-1])
    if not 1 < x2.shape[0] <= SMALL_M:
        return mod(x)
    y = torch.mm(mod.weight, x2.t()) if mod.bias is None else torch.addmm(mod.bias[:, None], mod.weight, x2.t())
    return y.t().contiguous().view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        h, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = (
            args.num_attention_heads, args.num_key_value_heads, hd, layer_idx)
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=args.o_bias)

    def forward(self, x, cos, sin, plan: AttnPlan, cache: CacheView | None = None):
        B, T, _ = x.shape
        if plan.kind in PACKED_PLANS:
            return self.forward_packed(x, cos, sin, plan)
        q = linear(self.q_proj, x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = linear(self.k_proj, x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = linear(self.v_proj, x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # [B, H, T, D]; a cache stores the new K/V and attends over what it holds
        y = attend(q, k, v, plan) if cache is None else cache.attend(self.layer_idx, q, k, v)
        return linear(self.o_proj, y.transpose(1, 2).reshape(B, T, -1))

    def forward_packed(self, x, cos, sin, plan: AttnPlan):
        """Packed rows, token-major: q/k/v stay [B, T, heads, D] as the projections give them (RoPE's cos/sin
        [B, 1, T, D] are viewed as [B, T, 1, D]), so varlen needs no transpose, copy or padding."""
        B, T, _ = x.shape
        q = linear(self.q_proj, x).view(B, T, self.n_heads, self.head_dim)
        k = linear(self.k_proj, x).view(B, T, self.n_kv_heads, self.head_dim)
        v = linear(self.v_proj, x).view(B, T, self.n_kv_heads, self.head_dim)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
        y = attend_packed(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, plan)  # [B, T, H, D]
        return linear(self.o_proj, y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b), nn.Linear(i, h, bias=b)

    def forward(self, x):
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttnPlan, cache: CacheView | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm, plus the (non-persistent) RoPE inverse frequencies."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_impl: str = "auto"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; expected one of {ATTN_IMPLS}")
        self.args, self.attn_impl = args, attn_impl
        self.activation_checkpointing, self.checkpoint_every = False, 1
        self.generation_config: dict | None = None  # generation_config.json of the loaded folder, written back on save
        self.model = DecoderModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- construction ----
    @classmethod
    def from_args(cls, args: ModelArgs, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  attn_impl: str = "auto", generator: torch.Generator | None = None) -> Transformer:
        """Builds the model. device="meta" gives an unallocated model: later `to_empty(device=...)`, then
        `reset_buffers()` and `load_hf_weights(path)` (or `init_weights()`). Any other device is initialised
        like HF (normal(0, 0.02) linears and embeddings, ones for norms, zero biases)."""
        with torch.device("meta"):
            model = cls(args, attn_impl=attn_impl)
        if dtype is not None:
            model.to(dtype)
        if torch.device(device or "cpu").type != "meta":
            model.to_empty(device=device or "cpu")
            model.reset_buffers()
            model.init_weights(generator=generator)
        return model

    def reset_buffers(self) -> None:
        """Recomputes the non-persistent RoPE buffer and re-ties lm_head to embed_tokens (when tied). Call after
        `to_empty(...)`: that allocates garbage buffers and unties shared parameters."""
        emb = self.model.embed_tokens.weight
        self.model.inv_freq = rope_inv_freq(self.args, device=emb.device)
        if self.args.tie_word_embeddings and self.lm_head.weight is not emb:
            self.lm_head.weight = emb

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """HF-style random init, deterministic for a seeded generator (parameters in named order)."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                dev = generator.device if generator is not None else p.device
                p.copy_(torch.randn(p.shape, generator=generator, device=dev) * std)

    def set_activation_checkpointing(self, enabled: bool, every: int = 1) -> None:
        """Recompute decoder blocks in backward (torch.utils.checkpoint, non-reentrant): every block, or with
        every=k every k-th one (blocks 0, k, 2k, ...: memory traded for less recompute). FQNs don't change."""
        if every < 1:
            raise ValueError(f"activation checkpointing every={every}: expected 1 (all blocks) or more")
        self.activation_checkpointing = bool(enabled)
        self.checkpoint_every = every

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: CacheView | None = None,
                key_padding_mask: torch.Tensor | None = None, return_hidden: bool = False,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or, with return_hidden, the final-norm hidden states [B, T, h]
        so a caller can apply `lm_head` in chunks).

        doc_ids [B, T]: packed rows; attention stays inside each document (run of equal ids); position_ids
          default to restarting at 0 per document.
        cu_seqlens [N_docs + 1] int32 + max_seqlen: the same documents as boundaries over the flattened B*T
          tokens (packing.py gives them; on the CPU for "per_doc", on the device for "varlen"); computed from
          doc_ids (one host sync) when not given. Give position_ids with them (packing.py does).
        key_padding_mask [B, T] bool: False marks padding; position_ids default to cumsum(mask) - 1.
        cache: a CacheView (decode.py): each layer hands it q/k/v and it stores k/v and does the attention;
          position_ids are then required.
        """
        B, T = input_ids.shape
        packed = doc_ids is not None or cu_seqlens is not None
        if packed and (cache is not None or key_padding_mask is not None):
            raise ValueError("doc_ids (packed rows) cannot be combined with cache or key_padding_mask; give padding "
                             "its own document id instead")
        if cache is not None and (position_ids is None or key_padding_mask is not None):
            raise ValueError("a cache needs explicit position_ids and no key_padding_mask")
        total = cache.max_len if cache is not None else T
        if self.args.sliding_window and total > self.args.sliding_window:
            raise ValueError(f"sequence length {total} exceeds sliding_window={self.args.sliding_window}; "
                             "sliding-window attention is not implemented")
        if position_ids is None:
            if doc_ids is None and cu_seqlens is not None:
                raise ValueError("cu_seqlens without doc_ids needs position_ids (restarting at 0 per document)")
            position_ids = default_position_ids(input_ids, doc_ids, key_padding_mask)
        plan = AttnPlan("cache") if cache is not None else make_attn_plan(
            self.resolved_attn_impl(input_ids.device), T, doc_ids, key_padding_mask, cu_seqlens, max_seqlen, B)
        h = self.model.embed_tokens(input_ids)
        inv_freq = self.model.inv_freq  # a later model.to(bf16) casts buffers too: RoPE needs the fp32 values
        if inv_freq.dtype != torch.float32:
            inv_freq = rope_inv_freq(self.args, device=inv_freq.device)
        cos, sin = rope_cos_sin(inv_freq, position_ids, h.dtype)
        use_ckpt = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            if use_ckpt and i % self.checkpoint_every == 0:
                h = checkpoint(layer, h, cos, sin, plan, use_reentrant=False)
            else:
                h = layer(h, cos, sin, plan, cache)
        h = self.model.norm(h)
        return h if return_hidden else linear(self.lm_head, h)

    def resolved_attn_impl(self, device: torch.device) -> str:
        if self.attn_impl != "auto":
            return self.attn_impl
        if device.type != "cuda":
            return "per_doc"
        half = torch.is_autocast_enabled("cuda") or self.model.embed_tokens.weight.dtype != torch.float32
        return "varlen" if half and varlen_available() else "flex"  # FlashAttention has no fp32 kernel

    # ---- HF I/O (section 4) ----
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_impl: str = "auto") -> Transformer:
        """Loads a local HF folder (config.json + model.safetensors or sharded with model.safetensors.index.json).
        No network, no remote code."""
        path = Path(path)
        args = load_config(path)
        model = cls.from_args(args, device="meta", dtype=dtype, attn_impl=attn_impl)
        model.to_empty(device=device)
        model.reset_buffers()
        model.load_hf_weights(path)
        gen = path / "generation_config.json"
        model.generation_config = read_json(gen) if gen.is_file() else None
        return model

    def load_hf_weights(self, path: str | os.PathLike, allow_missing: Iterable[str] = ("lora_",)) -> None:
        """Copies HF safetensors weights into the (already allocated) parameters, converting dtype. Errors name
        missing, unexpected and wrongly shaped keys. Parameters whose name contains any `allow_missing` substring
        (LoRA adapters by default) may be absent. Works for plain tensors and FSDP2 DTensor parameters."""
        files = weight_files(Path(path))
        self.reset_buffers()  # re-tie first, so a tied lm_head.weight is not expected in the files
        params = dict(self.named_parameters(remove_duplicate=True))
        expected = {k for k in params if not any(s in k for s in allow_missing)}
        found: dict[str, Path] = {}
        for f in files:
            with _safe_open(f) as sf:
                for k in sf.keys():
                    found[k] = f
        ignorable = {k for k in found if k.endswith("rotary_emb.inv_freq")
                     or (k == "lm_head.weight" and self.args.tie_word_embeddings)}
        missing, unexpected = sorted(expected - found.keys()), sorted(found.keys() - params.keys() - ignorable)
        if missing or unexpected:
            raise KeyError(f"weights in {path} do not match {self.args.model_type} model: "
                           f"missing {len(missing)} {missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}")
        by_file: dict[Path, list[str]] = {}
        for k in expected | (found.keys() & params.keys()):
            by_file.setdefault(found[k], []).append(k)
        with torch.no_grad():
            for f, keys in by_file.items():
                with _safe_open(f) as sf:
                    for k in keys:
                        try:
                            t = sf.get_tensor(k)
                        except Exception as e:  # SafetensorError: the data section is cut short
                            raise ValueError(f"{f}: cannot read {k} ({e}): the file is truncated or damaged") from None
                        _copy_into(params[k], t, k, f)
        self.reset_buffers()

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | None = None) -> None:
        """Writes HF format (see save_hf_weights) and generation_config.json when known."""
        sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in self.state_dict().items()}
        save_hf_weights(sd, path, self.args.to_hf_config(), max_shard_size, dtype)
        if self.generation_config is not None:
            write_json(Path(path) / "generation_config.json", self.generation_config)


def default_position_ids(input_ids, doc_ids, key_padding_mask) -> torch.Tensor:
    B, T = input_ids.shape
    if doc_ids is not None:
        return positions_from_doc_ids(doc_ids)
    if key_padding_mask is not None:
        return (key_padding_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(T, device=input_ids.device).expand(B, T)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... restarting at every document start (a change of doc id along the row)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    last_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


class LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(h_t W^T, y_t) over [N, h] hidden states, `chunk` rows at a time, with the gradients computed in
    the forward pass (Liger-style fused linear cross-entropy): the [N, vocab] logits never exist at once and,
    unlike a checkpointed chunk, the LM head is not recomputed in backward (one vocab-sized matmul fewer per
    chunk: ~10% of a Qwen2.5-0.5B LoRA step on CPU). Logits and softmax are fp32; the gradient for W (when W
    requires grad) is accumulated in fp32. `compute_dtype` is the matmul dtype (bf16 under autocast).
    Gradient work is done only for the inputs that need it: none with grad mode off (evaluation), where the
    forward is just the chunked logsumexp."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, need_h: bool, need_w: bool) -> torch.Tensor:
        w = weight.to(compute_dtype)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, len(y), chunk):
                hc, yc = h[i:i + chunk].to(compute_dtype), y[i:i + chunk]
                logits = (hc @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[i:i + chunk] = (g @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(g.t().float(), hc.float())  # fp32 accumulation (.float() is free in fp32)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = 1024,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed cross-entropy of `h @ weight.T` against labels y (no ignore index: select the rows first)."""
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {y.shape[0]} labels")
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(h, weight, y, max(1, chunk), compute_dtype or h.dtype,
                                    grad and h.requires_grad, grad and weight.requires_grad)


def head_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int, autocast,
                  ignore_index: int = -100, label_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` over the positions whose label is not `ignore_index`, `chunk` rows
    at a time, so the [tokens, vocab] logits never exist at once: linear_cross_entropy for a plain bias-free
    Linear head (gradients computed in the forward), else checkpointed chunks through the module (a LoRA head).
    `autocast` is the context the head runs under. Equals F.cross_entropy(head(hidden), labels, reduction="sum").
    `label_pos` (packing.py's, computed on the CPU): the flattened positions of those labels, which selects them
    without the host sync of a boolean mask."""
    if label_pos is None:
        keep = labels != ignore_index
        h, y = hidden[keep], labels[keep]
    else:
        h, y = hidden.reshape(-1, hidden.shape[-1])[label_pos], labels.reshape(-1)[label_pos]
    loss = hidden.sum().float() * 0.0  # keeps every rank's backward (and FSDP's reductions) alive on empty batches
    w = getattr(head, "weight", None)
    if type(head) is nn.Linear and head.bias is None and not hasattr(w, "device_mesh"):
        with autocast:  # the matmul dtype autocast would use
            cdt = torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) else w.dtype
        return loss + linear_cross_entropy(h, w, y, chunk, cdt)

    def chunk_ce(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = head(hc)
        return F.cross_entropy(logits.float(), yc, reduction="sum")

    for i in range(0, len(y), chunk):
        loss = loss + checkpoint(chunk_ce, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return loss


# --------------------------------------------------------------------------------------------------------------
# 4. HF files


class ModelFileError(UserError, ValueError):
    """A model folder's file (config.json, *.safetensors) is unreadable or unsupported; the message names the
    file, what was expected and the fix."""


def read_json(p: Path) -> dict:
    """A model folder's JSON file as a dict; a broken file is a ModelFileError naming file, line and column."""
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: expected a Hugging Face model folder with {p.name}")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{p}: not UTF-8 text (byte {e.start}); expected a JSON file: restore or "
                             "re-download it") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{p}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix that "
                             "spot, or restore the file from the model's source") from None
    if not isinstance(d, dict):
        raise ModelFileError(f"{p}: expected a JSON object, got a {type(d).__name__}; restore the file from the "
                             "model's source")
    return d


def load_config(folder: str | os.PathLike) -> ModelArgs:
    """ModelArgs from a folder's config.json; an unsupported or incomplete config is a ModelFileError naming it."""
    p = Path(folder) / CONFIG_NAME
    d = read_json(p)
    try:
        return ModelArgs.from_hf_config(d)
    except KeyError as e:
        raise ModelFileError(f"{p}: missing field {e}; expected a Hugging Face config.json of a Llama, Mistral "
                             "or Qwen2 model") from None
    except ValueError as e:
        raise ModelFileError(f"{p}: {e}; expected a config this decoder supports (README, "
                             "'Supported architectures')") from None


def check_safetensors(f: str | os.PathLike) -> dict:
    """Reads a safetensors file's header without loading tensors and checks that the file holds every byte
    it promises. Returns the header (tensor name -> dtype, shape, data_offsets). A truncated, damaged or
    non-safetensors file is a ModelFileError naming the file."""
    f = Path(f)
    fix = "copy or download the file again (the original source is intact if it loads elsewhere)"
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size or n > 100 * 2**20:
            raise ModelFileError(f"{f}: not a safetensors file (its first 8 bytes do not give a header length "
                                 f"that fits the {size}-byte file); {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
        raise ModelFileError(f"{f}: damaged safetensors header (not the JSON table of tensors it should be); "
                             f"{fix}") from None
    have, need = size - 8 - n, max(ends, default=0)
    if need > have:
        raise ModelFileError(f"{f}: truncated: the header promises {need:,} bytes of tensor data, the file holds "
                             f"{have:,}; {fix}")
    if need < have:
        raise ModelFileError(f"{f}: damaged: {have - need:,} bytes after the last tensor the header lists; {fix}")
    return header


def check_weights(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder (weight_files), each checked with check_safetensors: a fast
    pre-flight before allocating a model. Raises FileNotFoundError / ModelFileError naming the file."""
    files = weight_files(Path(folder))
    for f in files:
        check_safetensors(f)
    return files


def _safe_open(f: Path):
    """safetensors.safe_open with a clear error for a truncated or non-safetensors file."""
    from safetensors import safe_open

    try:
        return safe_open(f, framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
        raise ModelFileError(f"{f} is not a readable safetensors file ({e}): it is truncated or damaged; download "
                         f"or copy it again") from None


def save_hf_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, hf_config: dict,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
    """HF format: config.json (`hf_config` with the stored dtype) and model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json. A tied lm_head.weight is omitted."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
          for k, v in state_dict.items() if not (k == "lm_head.weight" and hf_config.get("tie_word_embeddings"))}
    shards = shard_state_dict(sd, parse_size(max_shard_size))
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, name)
        total = sum(v.numel() * v.element_size() for v in sd.values())
        write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    stored = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    write_json(path / CONFIG_NAME, {**hf_config, "torch_dtype": stored, "dtype": stored})


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: those listed in model.safetensors.index.json, or model.safetensors."""
    if (path / INDEX_NAME).is_file():
        weight_map = read_json(path / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{path / INDEX_NAME}: no 'weight_map' object; expected the index that "
                                 "save_pretrained writes: restore it from the model's source")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_NAME} lists weight files that do not exist: {missing}")
        return [path / n for n in names]
    if (path / SINGLE_WEIGHTS_NAME).is_file():
        return [path / SINGLE_WEIGHTS_NAME]
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
    hint = f" (found {other}: convert them to safetensors first)" if other else ""
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def _copy_into(param: torch.Tensor, t: torch.Tensor, key: str, f: Path) -> None:
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch for {key} in {f}: file has {tuple(t.shape)}, model expects "
                         f"{tuple(param.shape)} (is config.json the one these weights were saved with?)")
    if hasattr(param, "device_mesh"):  # FSDP2 DTensor: every rank reads the full tensor, keeps its shard (no comms)
        from torch.distributed.tensor import distribute_tensor

        t = distribute_tensor(t.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(t.to_local())
        return
    param.copy_(t)


def parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    u = s.strip().upper()
    for name, mult in units.items():
        if u.endswith(name) and u[: -len(name)].strip().replace(".", "", 1).isdigit():
            return int(float(u[: -len(name)]) * mult)
    if u.isdigit():
        return int(u)
    raise ValueError(f"max_shard_size={s!r}: expected bytes as int or a string like '5GB', '500MB'")


def shard_state_dict(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in key order: a new shard starts when the next tensor would overflow max_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


# --------------------------------------------------------------------------------------------------------------
# 5. decoding: the cache protocol (decode.py implements it: a static KV cache with slots)


class CacheView(Protocol):
    """What Transformer.forward needs from a KV cache: `attend` stores the new keys/values of one layer
    (q [B, H, T, D] and k/v [B, H_kv, T, D], RoPE applied) and returns the attention output [B, H, T, D] over
    everything the cache holds for those rows; `max_len` bounds the positions (sliding-window check)."""

    max_len: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
