"""LoRA for any nn.Module whose target leaves are nn.Linear: injection, merge/unmerge, PEFT-format adapters.

A `LoRALinear` keeps the base `weight`/`bias` as its own (frozen) parameters, so the Hugging Face key of
a targeted module stays `...q_proj.weight`, and adds `lora_A` (r x in) and `lora_B` (out x r):

    y = x W^T + b + lora_B(lora_A(dropout(x))) * scaling,    scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

A is kaiming_uniform(a=sqrt(5)) and B is zero (PEFT's `init_lora_weights=True`), so a fresh adapter is
the identity. Adapters are saved the way PEFT saves them (`adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight`, `adapter_config.json`) and the config uses only keys that
peft 0.7.1 (the version LESS pins) accepts, so LESS, current peft and this file all read them.

`modules_to_save` (PEFT's feature of that name) trains whole modules next to the adapters, e.g. the
embeddings, the output head and the RMSNorms of a base that needs them trained. A module is chosen the way
PEFT chooses it: its name ends with one of the strings (`norm` picks every RMSNorm, `embed_tokens` the
embeddings). Its parameters are trained in place (PEFT trains a copy and keeps the original for disabling
the adapter; the saved adapter and a merged model are the same) and saved in the adapter file under PEFT's
keys, `base_model.model.<module path>.weight`. On a model with tied embeddings `embed_tokens` and `lm_head`
are one weight: naming either trains it, and the adapter holds it under both keys with both names in its
config (PEFT with ensure_weight_tying writes the same two keys; PEFT without it loads two equal copies).

    cfg = LoraConfig(r=8, alpha=16)
    inject_lora(model, cfg)                    # targets -> LoRALinear, everything else frozen
    ... train ...
    save_adapter(model, cfg, "out/adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    load_adapter(fresh_model, "out/adapter")   # injects from the saved config, loads the weights
    merge_and_unload(model).save_pretrained("out/merged")   # plain nn.Linear again, HF format
"""
from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
PEFT_ADAPTER_NAME = "default"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# adapter_config.json keys that peft 0.7.1's LoraConfig(**json) accepts (anything else: TypeError in LESS).
PEFT_071_KEYS = frozenset({
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "r",
    "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "loftq_config",
})
# Wrapper infixes (activation checkpointing, torch.compile) that never appear in HF / PEFT names.
_WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False  # scaling alpha/sqrt(r); written to the config only when True (not LESS-readable)
    modules_to_save: tuple[str, ...] = ()  # whole modules trained and saved with the adapter (PEFT matching)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())
        if any(not m for m in self.modules_to_save):
            raise ValueError("LoraConfig.modules_to_save holds an empty name")
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; give leaf module names such as q_proj v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# --------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen linear layer (own `weight`, `bias`) plus a trainable low-rank update. Built directly, the base
    weight is uninitialised (load it); `from_linear` / `inject_lora` wrap an existing nn.Linear instead."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, use_rslora: bool = False, device=None, dtype=None, lora_dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        lora_dtype = lora_dtype or dtype
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=lora_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, lora_dtype=None) -> LoRALinear:
        """Wrap `linear`, reusing its weight/bias Parameter objects (works on the meta device too)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=False, use_rslora=use_rslora,
                device="meta", dtype=w.dtype, lora_dtype=lora_dtype)  # meta: no throwaway base allocation
        m.weight, m.bias = linear.weight, linear.bias
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(False)
        m.lora_A.to_empty(device=w.device)
        m.lora_B.to_empty(device=w.device)
        m.reset_lora_parameters()
        return m

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)), B = 0. Safe after `to_empty` and on FSDP2-sharded (DTensor) params:
        the full A is drawn on CPU from `generator` and each rank keeps its slice, so the init does not
        depend on the world size."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.device.type == "meta":
            return
        full = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        _copy_full_into(a, full)
        b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters compute in the activations' dtype: fp32 master adapters next to bf16 activations are cast
        to bf16 (small r x in / out x r weights; never an activation-sized fp32 copy), which is what FSDP2's
        param_dtype=bf16 does to them, so one GPU and FSDP2 give the same numbers. Under autocast F.linear
        casts to the autocast dtype instead."""
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        a, b = self.lora_A.weight, self.lora_B.weight
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return out + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, bias={self.bias is not None}, merged={self.merged}")


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into `param`, which may be a plain tensor or a DTensor (each rank its slice)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements,
                                  src_data_rank=None)  # no communication: every rank holds the same `full`
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


# --------------------------------------------------------------------------------------------------
# Injection, merging


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def matches_modules_to_save(name: str, modules_to_save) -> bool:
    """PEFT's rule: a module is saved when its name ends with one of the strings."""
    name = _clean_fqn(name)
    return any(name.endswith(m) for m in modules_to_save)


def effective_modules_to_save(modules_to_save, tied_embeddings: bool) -> tuple[str, ...]:
    """With tied embeddings, naming embed_tokens or lm_head names the one shared weight: add the other."""
    mts = tuple(modules_to_save or ())
    if tied_embeddings and any("lm_head".endswith(m) or "model.embed_tokens".endswith(m) for m in mts):
        mts += tuple(m for m in ("embed_tokens", "lm_head") if m not in mts)
    return mts


def saved_modules(model: nn.Module, cfg: LoraConfig) -> dict[str, nn.Module]:
    """{name: module} chosen by `cfg.modules_to_save` (outermost match only; wrapper infixes removed)."""
    out: dict[str, nn.Module] = {}
    mts = effective_modules_to_save(cfg.modules_to_save, _tied_embeddings(model))
    for name, m in model.named_modules():
        clean = _clean_fqn(name)
        if (name and matches_modules_to_save(clean, mts)
                and not any(clean.startswith(o + ".") for o in out)):
            out[clean] = m
    return out


def _tied_embeddings(model: nn.Module) -> bool:
    emb = next((m for n, m in model.named_modules() if n.endswith("embed_tokens")), None)
    head = next((m for n, m in model.named_modules() if _clean_fqn(n) == "lm_head"), None)
    return emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)


def inject_lora(model: nn.Module, cfg: LoraConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every nn.Linear whose leaf name is in `cfg.target_modules` by a LoRALinear (in place) and
    freeze every other parameter, except those of the modules chosen by `cfg.modules_to_save` (trained
    whole). `lm_head` is targeted only when listed; embeddings never are (save them instead).
    `dtype`: adapter dtype (default: that of the base weight); the saved modules are cast to it too, so a
    bf16 base gets fp32 trainable weights. Returns the replaced module names."""
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; inject_lora once per model (or merge_and_unload first)")
    targets = set(cfg.target_modules)
    if "embed_tokens" in targets or "wte" in targets:
        raise ValueError("LoRA on embedding layers is not supported; remove embed_tokens from target_modules")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [name for name, _ in linears if name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        seen = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise ValueError(f"LoRA target_modules {sorted(targets)} matched no nn.Linear in "
                         f"{type(model).__name__}; its Linear leaf names are {seen}. Pick some of these.")
    saved = saved_modules(model, cfg) if cfg.modules_to_save else {}
    if cfg.modules_to_save:
        every = [_clean_fqn(n) for n, _ in model.named_modules() if n]
        found = {m for m in cfg.modules_to_save if any(n.endswith(m) for n in every)}
        if found != set(cfg.modules_to_save):
            raise ValueError(f"LoRA modules_to_save {sorted(set(cfg.modules_to_save) - found)} matched no module "
                             f"of {type(model).__name__} (a module is saved when its name ends with the string, "
                             "e.g. embed_tokens, lm_head, norm)")
        clash = [n for n in saved if any(c == n or c.startswith(n + ".") or n.startswith(c + ".")
                                         for c in map(_clean_fqn, chosen))]
        if clash:
            raise ValueError(f"modules {clash[:4]} are both LoRA targets (or hold one) and in modules_to_save; "
                             "a module is either adapted or trained whole")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear.from_linear(getattr(parent, leaf), cfg.r, cfg.alpha, cfg.dropout,
                                                     cfg.use_rslora, lora_dtype=dtype))
    for m in saved.values():
        if dtype is not None:
            m.to(dtype)
        for p in m.parameters():
            p.requires_grad_(True)
    return chosen  # (Module.to keeps the Parameter objects, so a tied lm_head stays tied)


def reset_lora_parameters(model: nn.Module, seed: int | None = None) -> None:
    """Re-initialise every adapter (A kaiming, B zero), e.g. after `model.to_empty(...)` of a meta model.
    Each module draws from its own generator seeded by (seed, module name): the result does not depend on
    module order or world size. seed=None draws a base seed from the global torch RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    for name, m in lora_modules(model).items():
        # the CPU generator (mt19937) uses only 32 seed bits: mix seed and name into those 32
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{_clean_fqn(name)}".encode()))
        m.reset_lora_parameters(generator=g)


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain nn.Linear modules back under the same names (HF-exportable)."""
    for name, m in lora_modules(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for _, p in trainable_parameters(model)), sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def merged_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A full model state dict with LoRA tensors (our FQNs, e.g. gathered under FSDP2 with
    `get_model_state_dict(..., full_state_dict=True, cpu_offload=True)`) -> the plain HF state dict with
    every targeted weight replaced by W + scaling * B @ A (in fp32, cast back) and no lora_* keys."""
    sd = {_clean_fqn(k): v for k, v in state_dict.items()}
    out = {k: v for k, v in sd.items() if not _is_lora_key(k)}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            module = k[: -len(".lora_A.weight")]
            w, a, b = sd[module + ".weight"], sd[k], sd[module + ".lora_B.weight"]
            out[module + ".weight"] = (w.float() + (b.float() @ a.float()) * cfg.scaling).to(w.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# PEFT-format adapter files


def _clean_fqn(fqn: str) -> str:
    for infix in _WRAPPER_INFIXES:
        fqn = fqn.replace(infix, "")
    return fqn


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _is_saved_key(key: str, modules_to_save) -> bool:
    """A parameter FQN (`model.norm.weight`) that lies in a module chosen by modules_to_save."""
    if not modules_to_save or _is_lora_key(key):
        return False
    parts = _clean_fqn(key).split(".")[:-1]
    return any(matches_modules_to_save(".".join(parts[:i]), modules_to_save) for i in range(1, len(parts) + 1))


def peft_file_key(fqn: str) -> str:
    """Our FQN `model.layers.0.self_attn.q_proj.lora_A.weight` -> the adapter file key
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (no adapter name)."""
    fqn = _clean_fqn(fqn).replace(f".lora_A.{PEFT_ADAPTER_NAME}.", ".lora_A.")
    fqn = fqn.replace(f".lora_B.{PEFT_ADAPTER_NAME}.", ".lora_B.")
    return fqn if fqn.startswith(PEFT_PREFIX) else PEFT_PREFIX + fqn


def peft_param_name(fqn: str) -> str:
    """Our FQN -> the live PeftModel parameter name, with the adapter name:
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` (LESS keys optimizer.bin so)."""
    key = peft_file_key(fqn)
    return key.replace(".lora_A.", f".lora_A.{PEFT_ADAPTER_NAME}.").replace(
        ".lora_B.", f".lora_B.{PEFT_ADAPTER_NAME}.")


def _fqn_from_peft_key(key: str) -> str:
    """Adapter file key (with or without `.default.`; a saved module's key with or without PEFT's
    `.modules_to_save.default.` wrapper infix) -> our FQN."""
    key = key.replace(f".lora_A.{PEFT_ADAPTER_NAME}.", ".lora_A.").replace(
        f".lora_B.{PEFT_ADAPTER_NAME}.", ".lora_B.").replace(f".modules_to_save.{PEFT_ADAPTER_NAME}.", ".")
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def adapter_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                       modules_to_save=(), tied_embeddings: bool | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors (lora_A/lora_B, plus the parameters of the modules chosen by `modules_to_save`)
    under PEFT file keys, detached, on CPU, contiguous. Takes a model or a state dict keyed by our FQNs (e.g.
    the trainable tensors gathered on rank 0 under FSDP2). `tied_embeddings` (a state dict only; a model is
    inspected): lm_head is embed_tokens, so a saved embedding is written under `lm_head.weight` too."""
    if isinstance(model_or_state_dict, nn.Module):
        tied_embeddings = _tied_embeddings(model_or_state_dict)
        sd = model_or_state_dict.state_dict()  # tied: both keys
    else:
        sd = dict(model_or_state_dict)
    modules_to_save = effective_modules_to_save(modules_to_save, bool(tied_embeddings))
    if tied_embeddings and "lm_head.weight" not in sd:
        emb = next((k for k in sd if _clean_fqn(k).endswith("embed_tokens.weight")
                    and _is_saved_key(k, modules_to_save)), None)
        if emb is not None:
            sd["lm_head.weight"] = sd[emb]
    out, seen = {}, set()
    for k, v in sd.items():
        if not (_is_lora_key(k) or _is_saved_key(k, modules_to_save)):
            continue
        if type(v) is not torch.Tensor and hasattr(v, "full_tensor"):
            raise TypeError(f"adapter tensor {k} is a DTensor; gather first with get_model_state_dict(model, "
                            "options=StateDictOptions(full_state_dict=True, cpu_offload=True, "
                            "ignore_frozen_params=True))")
        t = v.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # a tied weight under two keys: safetensors wants separate storage
            t = t.clone()
        seen.add(t.data_ptr())
        out[peft_file_key(k)] = t
    if not out:
        raise ValueError("no lora_A/lora_B tensors found: call inject_lora(model, cfg) before saving an adapter")
    return out


def adapter_config_dict(cfg: LoraConfig, base_model_name_or_path: str,
                        target_modules: list[str] | None = None, modules_to_save=None) -> dict:
    """adapter_config.json content: only keys peft 0.7.1 accepts (plus use_rslora, only when True)."""
    d = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": list(target_modules or cfg.target_modules),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": list(modules_to_save or cfg.modules_to_save) or None,
        "init_lora_weights": True,
    }
    if cfg.use_rslora:
        d["use_rslora"] = True  # peft >= 0.8 only: LESS (peft 0.7.1) cannot read such an adapter
    return d


def save_adapter(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], cfg: LoraConfig,
                 out_dir: str | Path, base_model_name_or_path: str, tied_embeddings: bool | None = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT format) into out_dir.
    target_modules in the config are the leaf names actually adapted (from the tensors); the parameters of
    `cfg.modules_to_save` go into the same file (see adapter_state_dict for `tied_embeddings`)."""
    if isinstance(model_or_state_dict, nn.Module):
        tied_embeddings = _tied_embeddings(model_or_state_dict)
    mts = effective_modules_to_save(cfg.modules_to_save, bool(tied_embeddings))
    sd = adapter_state_dict(model_or_state_dict, mts, tied_embeddings)
    saved_keys = [_fqn_from_peft_key(k) for k in sd if not _is_lora_key(k)]
    lost = [m for m in mts if not any(_is_saved_key(k, [m]) for k in saved_keys)]
    if lost:
        raise ValueError(f"modules_to_save {lost} have no tensors in what was given to save_adapter; pass the "
                         "model, or a state dict holding those modules' parameters")
    for k, v in sd.items():
        if not _is_lora_key(k):
            continue
        r = v.shape[0] if ".lora_A." in k else v.shape[1]
        if r != cfg.r:
            raise ValueError(f"adapter tensor {k} has rank {r} but LoraConfig.r={cfg.r}; pass the config "
                             "the model was injected with")
    leaves = {k.split(".")[-3] for k in sd if _is_lora_key(k)}  # ...q_proj.lora_A.weight -> q_proj
    targets = [t for t in cfg.target_modules if t in leaves] + sorted(leaves - set(cfg.target_modules))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config_dict(cfg, base_model_name_or_path, targets, mts)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoraConfig, str | None]:
    """(LoraConfig, base_model_name_or_path) from a PEFT adapter_config.json; rejects PEFT features that
    this file does not implement instead of silently loading something else."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    d = json.loads(path.read_text())
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {d.get('peft_type')!r}, only 'LORA' adapters are supported")
    unsupported = {
        "bias": d.get("bias", "none") != "none", "fan_in_fan_out": bool(d.get("fan_in_fan_out")),
        "modules_to_save (not a list)": d.get("modules_to_save") is not None and not isinstance(
            d.get("modules_to_save"), list), "layers_to_transform": d.get("layers_to_transform") is not None,
        "rank_pattern": bool(d.get("rank_pattern")), "alpha_pattern": bool(d.get("alpha_pattern")),
        "use_dora": bool(d.get("use_dora")), "target_modules (regex string)": isinstance(d.get("target_modules"), str),
        "lora_bias": bool(d.get("lora_bias")), "layer_replication": bool(d.get("layer_replication")),
        "exclude_modules": bool(d.get("exclude_modules")), "target_parameters": bool(d.get("target_parameters")),
        "trainable_token_indices": bool(d.get("trainable_token_indices")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {bad}; lora.py handles plain LoRA on nn.Linear "
                         "(bias none, no fan_in_fan_out/patterns/DoRA, target_modules and modules_to_save lists)")
    cfg = LoraConfig(r=int(d["r"]), alpha=d["lora_alpha"], dropout=float(d.get("lora_dropout") or 0.0),
                     target_modules=tuple(d["target_modules"]), use_rslora=bool(d.get("use_rslora", False)),
                     modules_to_save=tuple(d.get("modules_to_save") or ()))
    return cfg, d.get("base_model_name_or_path")


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT-format adapter onto `model` (its base). Injects LoRA from the adapter's config unless the
    model already has LoRA layers. File keys may carry `.default.` or not. The modules_to_save tensors
    overwrite those modules' weights in place. Errors name every missing, unexpected or mis-shaped tensor."""
    adapter_dir = Path(adapter_dir)
    cfg, _ = read_adapter_config(adapter_dir)
    modules = lora_modules(model)
    if not modules:
        inject_lora(model, cfg, dtype=dtype)
        modules = lora_modules(model)
    for name, m in modules.items():
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge_lora(model) before loading an adapter")
        if not math.isclose(m.scaling, cfg.scaling):
            raise ValueError(f"{name} has scaling {m.scaling:g} but {adapter_dir} has {cfg.scaling:g} "
                             f"(r={cfg.r}, lora_alpha={cfg.alpha}); load onto a model without LoRA layers")
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (only safetensors adapters are read)")
    theirs = {_fqn_from_peft_key(k): v for k, v in load_file(str(path)).items()}
    ours = {_clean_fqn(n): p for n, p in model.named_parameters() if _is_lora_key(n)}
    mts = effective_modules_to_save(cfg.modules_to_save, _tied_embeddings(model))
    if mts:  # state_dict(keep_vars) lists a tied lm_head.weight too
        ours |= {_clean_fqn(n): p for n, p in model.state_dict(keep_vars=True).items() if _is_saved_key(n, mts)}
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = [f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in sorted(ours.keys() & theirs.keys()) if theirs[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit this model: {len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, {len(shapes)} shape mismatches "
                         f"{shapes[:4]}. Was the adapter trained on this base model and architecture?")
    first: dict[int, str] = {}
    for k, p in ours.items():
        if id(p) in first and not torch.equal(theirs[k].to(p.dtype), theirs[first[id(p)]].to(p.dtype)):
            raise ValueError(f"{path}: {first[id(p)]} and {k} differ but are one (tied) weight in this model; the "
                             "adapter was trained with untied copies (PEFT without ensure_weight_tying)")
        first.setdefault(id(p), k)
        p.copy_(theirs[k])
    return model
