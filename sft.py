"""Supervised fine-tuning (LoRA or full) of a Llama-family model on math data, in plain torch.

    python sft.py --config configs/train_lora.yaml --model_name_or_path models/Qwen2.5-0.5B
    torchrun --nproc_per_node=8 sft.py --use_lora --datasets gsm8k math --job_name qwen-lora
    python sft.py --dry_run --model_name_or_path Qwen/Qwen2.5-1.5B         # params + memory, no weights
    bash scripts/train/lora_train.sh "train.jsonl" models/llama-2-7b llama2-7b-lora   # LESS flags

Read top to bottom:
  1. config      - one flat dataclass; YAML files (--config, repeatable, or `configs:` inside a YAML) give
                   defaults, flags override; unknown keys/flags are errors with a did-you-mean
  2. LESS        - the LESS / HF-Trainer flag string translated into native flags (one table)
  3. setup       - process group, model (meta -> LoRA -> FSDP2 -> weights), optimizer, schedule, data
  4. state       - checkpoint save/resume on top of checkpoint.py (atomic folders, shards, LESS files)
  5. loop        - accumulation, global-token loss, guards, eval, logging, signals, checkpoints
  6. dry run     - parameter counts and a per-GPU memory estimate
  7. main

Loss: the sum of token cross-entropies over every completion token of the accumulated global batch
(all micro-steps, all ranks) divided by the number of those tokens (all-reduced before the backward
passes), i.e. a mean over tokens, not a mean of per-row means. FSDP averages gradients over ranks, so
each rank's backward uses loss_sum * world / n_tokens: the average is then exactly the gradient of that
mean (the same as set_gradient_divide_factor(1.0), which gloo cannot do: no PREMUL_SUM).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.utils.checkpoint import checkpoint

import checkpoint as ck

REPO = Path(__file__).resolve().parent


# ============================================================================= 1. config

def _parse_bool(args: list[str]) -> bool:
    if not args:
        return True
    v = args[0].strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {args[0]!r}")


# `--flag`, `--flag true`, `--flag False` all work (tyro's default bool is a --flag/--no-flag pair).
Bool = Annotated[
    tyro.conf.FlagConversionOff[bool],
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=(0, 1), metavar="[{true,false}]", instance_from_str=_parse_bool,
        is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda b: [str(b).lower()]),
]


@dataclass
class Config:
    """mathsft SFT. YAML files (--config, repeatable) give defaults; flags override them."""

    # --- model

    model_name_or_path: str = "models/Qwen2.5-0.5B"  # local HF folder (config.json, safetensors, tokenizer)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    activation_checkpointing: Bool = False  # recompute each block in backward (less memory, ~30% slower)
    attn_impl: str = "auto"  # model.py attention: auto | sdpa_mask | per_doc | flex
    loss_chunk_tokens: int = 1024  # lm_head + loss over completion tokens only, in recomputed chunks (0: off)
    # --- LoRA (--use_lora false: full fine-tuning)

    use_lora: Bool = True  # LoRA (base frozen, adapters trained); false: full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA scaling = alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA branch input
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")
    lora_modules_to_save: tuple[str, ...] = ()  # whole modules trained (and saved in the adapter) next to LoRA,
    # PEFT's modules_to_save: a module whose name ends with a string, e.g. embed_tokens lm_head norm (not in LESS mode)
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): the B matrices learn at this multiple of the lr
    save_merged: Bool = False  # LoRA: also write the merged model (HF format) into each checkpoint/merged/
    # --- data (passed to data.prepare; see docs/data.md)

    datasets: tuple[str, ...] = ("gsm8k",)  # names (gsm8k, math) or jsonl paths
    train_files: tuple[str, ...] = ()  # jsonl files; when given they replace --datasets
    data_dir: str = "data/raw"  # holds <name>/{train,test}.jsonl for named datasets
    template: str = "boxed"  # data/prompts/<name>.json; recorded in every checkpoint
    max_seq_length: int = 1024  # packed row length (and truncation length)
    packing: Bool = True  # pack documents into rows; false: one example per row, HF-style batches
    truncation: Literal["truncate", "drop"] = "truncate"
    valid_fraction: float = 0.05  # validation split carved from train (eval loss / accuracy)
    split_ratios: tuple[float, float, float] | None = None  # train/valid/test for files without splits
    ratios: tuple[float, ...] | None = None  # dataset mixing weights
    percentage: float = 1.0  # LESS: fraction of the pooled train set
    sample_data_seed: int = 42  # LESS: seed of that subsample
    data_seed: int = 0  # splits and mixing (data.py's `seed`)
    math_levels: tuple[int, ...] | None = None  # keep only these MATH levels
    math_sample: int | None = None  # stratified MATH train sample size
    skip_bad_rows: Bool = False  # skip and count malformed rows instead of failing
    num_proc: int = 1  # tokenizer processes for data.prepare
    data_cache_dir: str = "data/processed"  # token caches (data.py out_dir)
    # --- optimisation

    learning_rate: float = 2e-4  # peak learning rate
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of the peak
    weight_decay: float = 0.0  # not applied to biases and norm weights
    adam_beta1: float = 0.9  # AdamW betas/eps (LESS assumes 0.9, 0.999, 1e-8)
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    num_train_epochs: int = 1  # epochs (ignored when --max_steps > 0)
    max_steps: int = 0  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4  # packing: rows of max_seq_length tokens; else examples
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # --- run folder and checkpoints

    output_dir: str = "outputs/checkpoints"  # parent of the run folder
    job_name: str = ""  # the run folder is <output_dir>/<job_name>; default <model>-<lora|full>-<data>
    overwrite_output_dir: Bool = False  # delete an existing run's checkpoints and start over
    resume_from_checkpoint: str = ""  # auto (newest complete checkpoint of this job) | PATH
    save_strategy: Literal["steps", "epoch", "no"] = "steps"  # the last step is always saved
    save_steps: int = 100
    save_total_limit: int = 3  # interval checkpoints kept (0: all); best is kept in addition
    less_compat: Bool = False  # LESS layout: checkpoint-{step}, optimizer.bin (set by LESS flags)
    seed: int = 0  # model init (adapters), data order, dropout
    # --- evaluation

    eval_steps: int = 0  # 0: no evaluation during training
    eval_max_batches: int = 50  # validation-loss batches per evaluation
    eval_accuracy_samples: int = 0  # > 0: also greedy-decode this many validation problems (evalmath)
    eval_max_new_tokens: int = 512  # decoding budget for in-training accuracy
    metric_for_best: Literal["loss", "accuracy"] = "loss"  # what checkpoint-best means
    early_stopping_patience: int = 0  # stop after N evaluations without a new best (0: off)
    # --- guards

    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    spike_factor: float = 0.0  # > 0: loss above factor x running median -> roll back, scale the lr down
    spike_window: int = 20  # losses in the running median
    backoff_lr_scale: float = 0.5  # lr multiplier per roll-back
    max_backoffs: int = 3  # roll-backs before giving up with an error
    # --- logging and misc

    logging_steps: int = 1  # progress line + metrics.jsonl every N steps
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # if installed; else a notice
    logging_dir: str = "logs"  # TensorBoard events go to <logging_dir>/<job_name>/
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    deterministic: Bool = False  # torch.use_deterministic_algorithms
    dry_run: Bool = False  # build on the meta device, print parameters and a memory estimate, exit
    dry_run_world_size: int = 0  # GPUs to assume in the memory estimate (0: the current world size)


# ============================================================================= 2. LESS flag translation

# LESS's `less/scripts/train/base_training_args.sh` (transformers 4.36 HfArgumentParser flags) -> native.
# A string value names the native flag; None marks a flag accepted without effect (listed once in the log);
# a callable maps the raw values to a list of native (flag, values) pairs.
_NOOP = None
LESS_FLAGS: dict[str, Any] = {
    "do_train": _NOOP, "use_fast_tokenizer": _NOOP, "evaluation_strategy": _NOOP, "eval_strategy": _NOOP,
    "tf32": _NOOP, "overwrite_cache": _NOOP, "preprocessing_num_workers": _NOOP, "data_seed": _NOOP,
    "fsdp": _NOOP, "fsdp_config": _NOOP, "config_name": _NOOP, "tokenizer_name": _NOOP, "cache_dir": _NOOP,
    "model_revision": _NOOP, "use_auth_token": _NOOP, "torch_dtype": _NOOP, "analysis_mode": _NOOP,
    "analysis_dataset": _NOOP, "train_dataset_names": _NOOP, "ddp_find_unused_parameters": _NOOP,
    "remove_unused_columns": _NOOP, "dataloader_num_workers": _NOOP,
    "lora": "use_lora", "gradient_checkpointing": "activation_checkpointing",
    "bf16": lambda v: [("precision", ["auto"])] if _parse_bool(v) else [("precision", ["fp32"])],
    "fp16": lambda v: _less_fp16(v),
    "optim": lambda v: _less_optim(v),
    "output_dir": lambda v: [("output_dir", [str(Path(v[0]).parent)]), ("job_name", [Path(v[0]).name])],
}
LESS_DEFAULTS = {"less_compat": ["true"], "packing": ["false"], "template": ["tulu"], "save_total_limit": ["0"],
                 "lr_scheduler_type": ["linear"], "warmup_ratio": ["0.03"], "learning_rate": ["2e-05"],
                 "num_train_epochs": ["4"], "save_strategy": ["epoch"], "use_lora": ["false"],
                 "valid_fraction": ["0"]}  # LESS trains on every example of --train_files


def _less_fp16(v: list[str]) -> list:
    if _parse_bool(v):
        raise SystemExit("error: --fp16 True is not supported (use --bf16 True, or drop the flag)")
    return []


def _less_optim(v: list[str]) -> list:
    if v and v[0] not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        raise SystemExit(f"error: --optim {v[0]}: only AdamW is implemented (adamw_torch); change the flag")
    return []


def is_less_argv(argv: list[str]) -> bool:
    return any(a in ("--do_train", "--lora", "--less") or a.startswith(("--do_train=", "--lora="))
               for a in argv)


def _group_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    groups: list[tuple[str, list[str]]] = []
    for a in argv:
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            groups.append((name.replace("-", "_"), [val] if eq else []))
        elif groups:
            groups[-1][1].append(a)
        else:
            raise SystemExit(f"error: unexpected positional argument {a!r} (every option is a --flag)")
    return groups


def translate_less(argv: list[str]) -> tuple[list[str], list[str]]:
    """LESS/HF flag list -> (native argv, names of flags accepted without effect). The last occurrence of
    a repeated flag wins (argparse semantics); `--less` alone switches LESS mode on."""
    native_fields = {f.name for f in dataclasses.fields(Config)}
    last: dict[str, list[str]] = {}
    for name, vals in _group_flags(argv):
        last.pop(name, None)  # re-insert so the order is that of the last occurrence
        last[name] = vals
    last.pop("less", None)
    out: dict[str, list[str]] = {k: v for k, v in LESS_DEFAULTS.items()}
    ignored = []
    for name, vals in last.items():
        if name in LESS_FLAGS:
            rule = LESS_FLAGS[name]
            if rule is None:
                ignored.append(name)
            elif isinstance(rule, str):
                out[rule] = vals
            else:
                for k, v in rule(vals):
                    out[k] = v
        elif name in native_fields or name == "config":
            out[name] = vals
        else:
            near = difflib.get_close_matches(name, list(native_fields) + list(LESS_FLAGS), n=1)
            raise SystemExit(f"error: unknown flag --{name} (LESS mode)"
                             + (f"; did you mean --{near[0]}?" if near else ""))
    if "per_device_train_batch_size" in last and "packing" not in last:
        out["packing"] = ["false"]
    native = [tok for k, v in out.items() for tok in (f"--{k}", *v)]
    return native, ignored


# ----------------------------------------------------------------------------- YAML + flags

# Keys of data.py's PrepareConfig YAML (configs/data_*.yaml) whose name differs here; None: not used by sft.
DATA_YAML_KEYS = {"seed": "data_seed", "sample_seed": "sample_data_seed", "out_dir": "data_cache_dir",
                  "tokenizer": None}


def _yaml_chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, mapping)] for `path` and the files its `configs:` key names (relative to it), bases first."""
    import yaml

    if not path.is_file():
        raise SystemExit(f"error: --config {path}: no such file")
    if path.resolve() in seen:
        raise SystemExit(f"error: {path}: `configs:` include cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"error: {path}: expected a mapping of config keys, got {type(raw).__name__}")
    out = []
    for inc in raw.pop("configs", None) or []:
        out += _yaml_chain(path.parent / inc, seen + (path.resolve(),))
    return out + [(path, raw)]


def _apply_yaml(base: Config, path: Path, raw: dict) -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    is_data_yaml = "tokenizer" in raw or "out_dir" in raw  # a data.py PrepareConfig file
    for key, value in raw.items():
        name = DATA_YAML_KEYS.get(key, key) if is_data_yaml else key
        if name is None:
            continue
        if name not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise SystemExit(f"error: {path}: unknown key '{key}'" + (f"; did you mean '{near[0]}'?" if near else "")
                             + f". Valid keys: python {Path(sys.argv[0]).name} --help")
        default = getattr(Config, name, None)
        if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:  # PyYAML reads `2e-4` (no dot) as a string
                value = float(value)
            except ValueError:
                raise SystemExit(f"error: {path}: {key}: expected a number, got {value!r}") from None
        setattr(base, name, tuple(value) if isinstance(value, list) else value)


def parse_args(argv: list[str]) -> tuple[Config, list[str]]:
    """argv -> (Config, notes). LESS flag strings are translated first; then `--config` YAML files
    (repeatable, later ones win) become defaults and the remaining flags override them."""
    notes = []
    if is_less_argv(argv):
        argv, ignored = translate_less(argv)
        notes.append("LESS flags translated to: " + " ".join(argv))
        if ignored:
            notes.append("LESS/HF flags accepted without effect here: " + ", ".join(f"--{n}" for n in ignored))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[], nargs="+")
    known, rest = pre.parse_known_args(argv)
    base = Config()
    for group in known.config:
        for p in group:
            for path, raw in _yaml_chain(Path(p)):
                _apply_yaml(base, path, raw)
                notes.append(f"config file: {path}")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = tyro.cli(Config, default=base, args=rest, use_underscores=True, console_outputs=rank0)
    return cfg, notes


def check_config(cfg: Config) -> list[str]:
    """Clear errors for impossible settings; returns warnings."""
    warnings = []
    errors = []
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.save_strategy == "steps" and cfg.save_steps < 1:
        errors.append("--save_steps must be >= 1 with --save_strategy steps")
    if cfg.max_steps <= 0 and cfg.num_train_epochs < 1:
        errors.append("give --num_train_epochs >= 1 or --max_steps > 0")
    if not 0 < cfg.percentage <= 1:
        errors.append(f"--percentage must be in (0, 1], got {cfg.percentage}")
    if cfg.metric_for_best == "accuracy" and cfg.eval_accuracy_samples <= 0 and cfg.eval_steps > 0:
        errors.append("--metric_for_best accuracy needs --eval_accuracy_samples N > 0")
    if cfg.less_compat and cfg.lora_modules_to_save:
        errors.append("--lora_modules_to_save is not available in LESS mode: LESS reads adapters without "
                      "embedding/lm_head/norm weights and keys optimizer.bin by LoRA parameter names only")
    if cfg.early_stopping_patience and not cfg.eval_steps:
        errors.append("--early_stopping_patience needs --eval_steps N > 0")
    if not cfg.loraplus_lr_ratio > 0:
        errors.append(f"--loraplus_lr_ratio must be > 0 (1: plain LoRA; LoRA+ uses ~16), got {cfg.loraplus_lr_ratio}")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    if not cfg.use_lora:
        lora_defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name.startswith("lora")}
        changed = [n for n, d in lora_defaults.items() if getattr(cfg, n) != d and not cfg.less_compat]
        if changed or cfg.save_merged:
            warnings.append(f"--use_lora false: LoRA-only settings have no effect: "
                            f"{', '.join('--' + n for n in changed + (['save_merged'] if cfg.save_merged else []))}")
    return warnings


def default_job_name(cfg: Config) -> str:
    data = "+".join(Path(s).stem for s in (cfg.train_files or cfg.datasets))
    return f"{Path(cfg.model_name_or_path).name}-{'lora' if cfg.use_lora else 'full'}-{data}"


# ============================================================================= 3. setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python sft.py` runs as one process, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    # generous timeout: rank 0 may tokenize a large dataset while the others wait at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, local_rank, device, mesh)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Shapes of models users ask about before downloading them (config.json fields), for --dry_run only.
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                                     intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def read_model_config(path: str, allow_known: bool = False) -> dict:
    p = Path(path)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    if allow_known:
        for name, shape in KNOWN_CONFIGS.items():
            if path.lower() in (name.lower(), name.split("/")[1].lower()):
                return dict(shape)
    hint = f" (--dry_run also knows {', '.join(KNOWN_CONFIGS)})" if allow_known else ""
    if not p.exists():
        raise SystemExit(f"error: --model_name_or_path {path}: no such folder. Download the model beforehand "
                         f"(a local HF folder with config.json, *.safetensors and tokenizer files), or make a "
                         f"tiny one: python model.py make-tiny --out {path} --arch qwen2{hint}")
    raise SystemExit(f"error: --model_name_or_path {path}: no config.json in that folder{hint}")


def precision_dtype(cfg: Config, d: Dist) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_model(cfg: Config, d: Dist, hf_config: dict, device: str | torch.device = "meta"):
    """Meta-device model -> LoRA injected (adapters fp32, base in the compute dtype) -> activation
    checkpointing -> FSDP2 per block + root (world > 1). Returns (model, lora_cfg or None)."""
    import lora
    import model as M

    margs = M.ModelArgs.from_hf_config(hf_config)
    compute = precision_dtype(cfg, d)
    base_dtype = compute if cfg.use_lora else torch.float32  # full FT: fp32 master weights
    model = M.Transformer.from_args(margs, device="meta", dtype=base_dtype, attn_impl=cfg.attn_impl)
    lcfg = None
    if cfg.use_lora:
        lcfg = lora.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=tuple(cfg.lora_target_modules),
                               modules_to_save=tuple(cfg.lora_modules_to_save))
        try:  # adapters and saved modules in fp32 (trained), the frozen base in the compute dtype
            lora.inject_lora(model, lcfg, dtype=torch.float32)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if compute == torch.bfloat16 else MixedPrecisionPolicy())
        for block in model.model.layers:
            fully_shard(block, mesh=d.mesh, mp_policy=mp)
        fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model, lcfg


def load_weights(model, cfg: Config, d: Dist) -> None:
    """Allocate on the device, load the base HF weights (each rank keeps its shard), init adapters."""
    import lora

    model.to_empty(device=d.device)
    model.reset_buffers()
    try:  # DTensor parameters: each rank keeps its chunk, no collectives
        model.load_hf_weights(cfg.model_name_or_path)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"error: --model_name_or_path {cfg.model_name_or_path}: {e}") from None
    if cfg.use_lora:
        lora.reset_lora_parameters(model, seed=cfg.seed)


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(cfg: Config, named: list[tuple[str, torch.nn.Parameter]], d: Dist) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no weight decay on biases and norm weights (1-D). With
    --loraplus_lr_ratio R != 1 the LoRA B matrices get their own group whose lr is R x the schedule's
    (the group's `lr_ratio`, applied every step)."""
    plus = cfg.use_lora and cfg.loraplus_lr_ratio != 1.0
    lora_b = [p for n, p in named if plus and ".lora_B" in n]
    decay = [p for _, p in named if p.ndim >= 2 and not any(p is b for b in lora_b)]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": lora_b, "weight_decay": cfg.weight_decay, "lr_ratio": cfg.loraplus_lr_ratio}]
    groups = [g for g in groups if g["params"]]
    fused = d.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=fused or None)


@dataclass
class Schedule:
    """Learning rate as a function of the optimizer step (HF's formulas: the update at step s uses
    lr(s), so with warmup the first update has lr 0, exactly as the HF Trainer)."""
    peak: float
    total: int
    warmup: int
    kind: str
    min_ratio: float = 0.0
    scale: float = 1.0  # multiplied in by instability back-offs

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            f = step / max(1, self.warmup)
        elif self.kind == "constant":
            f = 1.0
        else:
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            f = max(0.0, 1 - progress) if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1, progress)))
            f = self.min_ratio + (1 - self.min_ratio) * f
        return self.peak * f * self.scale


@dataclass
class Data:
    train: Any  # packing.PackedLoader
    valid: Any | None
    cache_root: Path
    updates_per_epoch: int
    total_steps: int
    epoch_end_steps: list[int]


def build_data(cfg: Config, d: Dist, log) -> Data:
    """data.prepare (rank 0 first, the others then reuse the cache) -> packed loaders and step counts."""
    import data
    import packing

    sources = list(cfg.train_files or cfg.datasets)
    kw = dict(data_dir=cfg.data_dir, tokenizer_path=cfg.model_name_or_path, template=cfg.template,
              max_seq_length=cfg.max_seq_length, out_dir=cfg.data_cache_dir, seed=cfg.data_seed,
              truncation=cfg.truncation, ratios=list(cfg.ratios) if cfg.ratios else None,
              percentage=cfg.percentage, sample_seed=cfg.sample_data_seed, skip_bad_rows=cfg.skip_bad_rows,
              valid_fraction=cfg.valid_fraction, split_ratios=list(cfg.split_ratios) if cfg.split_ratios else None,
              math_levels=list(cfg.math_levels) if cfg.math_levels else None, math_sample=cfg.math_sample,
              num_proc=cfg.num_proc)
    train_dir = None
    for turn in (0, 1):  # rank 0 builds, then everyone (re)opens the cache
        if (turn == 0) == d.main:
            try:
                train_dir = data.prepare(sources, split="train", **kw)
            except data.DataError as e:
                raise SystemExit(f"error: {e}") from None
        barrier(d)
    valid_dir = train_dir.parent / "valid"
    loader_kw = dict(seq_len=cfg.max_seq_length, batch_size=cfg.per_device_train_batch_size, rank=d.rank,
                     world_size=d.world, seed=cfg.seed, packing=cfg.packing)
    train = packing.PackedLoader(train_dir, **loader_kw)
    valid = None
    if cfg.eval_steps > 0 and (valid_dir / "tokens.npy").is_file():
        valid = packing.PackedLoader(valid_dir, **{**loader_kw, "seed": 0})
    accum = cfg.gradient_accumulation_steps
    first = train.steps_in_epoch(0)  # micro-batches per rank in epoch 0
    if first < accum:
        raise SystemExit(f"error: one epoch has {first} micro-batches per rank, fewer than "
                         f"--gradient_accumulation_steps {accum}: lower the batch size, accumulation or number "
                         f"of processes, or add data")
    # HF Trainer semantics: max_steps = sum over epochs of (batches // accum); a partial accumulation
    # carries over an epoch boundary; epoch e ends after floor(cumulative batches / accum) updates.
    # (Packed epochs differ by a row or two, so each epoch is planned.)
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        total = sum(train.steps_in_epoch(e) // accum for e in range(cfg.num_train_epochs))
    ends, cum, e = [], 0, 0
    while not ends or ends[-1] < total:
        cum += train.steps_in_epoch(e)
        ends.append(min(cum // accum, total))
        e += 1
    train.set_epoch(0)
    return Data(train, valid, train_dir.parent, first // accum, total, sorted(set(ends)))


# ============================================================================= 4. run folder, logging, state

class RunLog:
    """Rank 0 only: progress lines to stdout and train.log, metrics.jsonl, optional TensorBoard / W&B."""

    def __init__(self, cfg: Config, job_dir: Path, d: Dist):
        self.on = d.main
        self.job_dir = job_dir
        self.tb = self.wandb = None
        self.pending: list[str] = []
        self.file = None
        if self.on:
            job_dir.mkdir(parents=True, exist_ok=True)
            if not os.environ.get("MATHSFT_LOG_TEED"):  # the LESS-style wrappers tee stdout into train.log
                self.file = open(job_dir / "train.log", "a", buffering=1)

    def __call__(self, msg: str) -> None:
        if self.on:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            if self.file is not None:
                self.file.write(line + "\n")

    def start_reporting(self, cfg: Config, job_name: str) -> None:
        if not self.on or cfg.report_to == "none":
            return
        try:
            if cfg.report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.logging_dir) / job_name))
            else:
                import wandb

                self.wandb = wandb.init(project="mathsft", name=job_name, config=dataclasses.asdict(cfg))
        except Exception as e:  # not installed, not logged in, ...
            self(f"notice: --report_to {cfg.report_to} unavailable ({type(e).__name__}: {e}); "
                 f"metrics go to metrics.jsonl only (pip install {cfg.report_to})")

    def metrics(self, record: dict) -> None:
        if not self.on:
            return
        with open(self.job_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they are recomputed identically)."""
        path = self.job_dir / "metrics.jsonl"
        if self.on and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.on:
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
            if self.file is not None:
                self.file.close()


def versions() -> dict:
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "tyro": tyro.__version__}


def prepare_job_dir(cfg: Config, job_dir: Path) -> None:
    """Refuse to clobber a previous run unless asked to resume or overwrite."""
    has_run = job_dir.is_dir() and (any(job_dir.glob("checkpoint-*")) or (job_dir / "config.json").exists())
    if not has_run or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        raise SystemExit(f"error: the run folder {job_dir} already holds a run (config.json or checkpoints). "
                         f"Pass --resume_from_checkpoint auto to continue it, --overwrite_output_dir true to "
                         f"start over, or choose another --job_name/--output_dir.")
    for p in list(job_dir.glob("checkpoint-*")) + list(job_dir.glob(".tmp-*")):
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p)
    # train.log too, unless a LESS-style wrapper is already tee-ing stdout into it
    logs = () if os.environ.get("MATHSFT_LOG_TEED") else ("train.log",)
    for name in ("metrics.jsonl", "config.json", ck.LATEST, *logs):
        (job_dir / name).unlink(missing_ok=True)


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly (saved as JSON)."""
    step: int = 0
    bad_in_row: int = 0
    skipped_steps: int = 0
    backoffs: int = 0
    lr_scale: float = 1.0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    loss_history: list = field(default_factory=list)
    tokens_seen: int = 0


def _test_kill(step: int, during_save: bool) -> None:
    """Test hook: MATHSFT_TEST_KILL_AT=step[:during_save] makes this process SIGKILL itself after that
    optimizer step (before any save), or in the middle of writing that step's checkpoint."""
    spec = os.environ.get("MATHSFT_TEST_KILL_AT")
    if not spec:
        return
    at, _, where = spec.partition(":")
    if int(at) == step and (where == "during_save") == during_save:
        os.kill(os.getpid(), signal.SIGKILL)


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def collect_state(named, optim, d: Dist) -> tuple[dict, set, dict]:
    """Trainable weights, optimizer moments and this rank's RNG as (local tensors, sharded keys, shapes)."""
    tensors, sharded, shapes = {}, set(), {}

    def add(key, t):
        if _is_dtensor(t):
            tensors[key], shapes[key] = t.to_local(), list(t.shape)
            sharded.add(key)
        else:
            tensors[key] = t

    for n, p in named:
        add(f"model.{n}", p.detach())
        for k, v in optim.state.get(p, {}).items():
            if torch.is_tensor(v):
                add(f"optim.{n}.{k}", v)
    tensors.update(ck.rng_state_tensors(d.rank))
    return tensors, sharded, shapes


@torch.no_grad()
def restore_state(path: Path, named, optim, d: Dist) -> tuple[dict, bool]:
    """Load weights, optimizer moments and RNG from a checkpoint; returns (trainer_state, exact)."""
    from torch.distributed.tensor import DTensor

    meta = json.loads((path / ck.TRAINER_STATE).read_text())
    tensors, saved_world = ck.load_state_shard(path, d.rank, d.world)
    missing = [n for n, _ in named if f"model.{n}" not in tensors]
    if missing:
        raise SystemExit(f"error: {path} does not match this model/config: no saved state for {missing[:4]} "
                         f"({len(missing)} parameters). Was it written with other --use_lora/--lora_* settings?")
    for n, p in named:
        t = tensors[f"model.{n}"]
        target = p.to_local() if _is_dtensor(p) else p
        if t.shape != target.shape:
            raise SystemExit(f"error: {path}: {n} has shape {tuple(t.shape)} in the checkpoint, "
                             f"{tuple(target.shape)} here")
        target.copy_(t)
        st = {}
        for key in [k for k in tensors if k.startswith(f"optim.{n}.")]:
            name, v = key[len(f"optim.{n}."):], tensors[key]
            if name == "step":
                group = next(g for g in optim.param_groups if any(q is p for q in g["params"]))
                dev = p.device if (group.get("fused") or group.get("capturable")) else "cpu"
                st[name] = v.to(dev)
            elif _is_dtensor(p):
                st[name] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                              shape=p.shape, stride=p.stride())
            else:
                st[name] = v.to(p.device)
        if st:
            optim.state[p] = st
    for g, saved in zip(optim.param_groups, meta["optimizer"]["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    exact = saved_world == d.world and ck.set_rng_state_tensors(tensors, d.rank)
    if not exact:
        seed_everything(meta["config"]["seed"] + 1000 * d.rank + meta["step"])
    return meta, exact


@dataclass
class Run:
    cfg: Config
    d: Dist
    job_dir: Path
    log: RunLog
    model: Any
    lcfg: Any
    hf_config: dict
    named: list
    optim: torch.optim.Optimizer
    data: Data
    sched: Schedule
    st: TrainState = field(default_factory=TrainState)
    saved: set = field(default_factory=set)
    last_eval: dict = field(default_factory=dict)


def base_model_ref(cfg: Config) -> str:
    """What adapter_config.json's base_model_name_or_path points at: the absolute local folder."""
    p = Path(cfg.model_name_or_path)
    return str(p.resolve()) if p.is_dir() else cfg.model_name_or_path


def _full_trainable(run: Run) -> dict[str, torch.Tensor]:
    """Unsharded trainable tensors (collective under FSDP: every rank must call)."""
    return {n: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu() for n, p in run.named}


def _full_model_state(run: Run) -> dict[str, torch.Tensor]:
    if run.d.world == 1:
        return {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_weights(run: Run, folder: Path) -> None:
    """LoRA: PEFT adapter (+ merged HF model with --save_merged); full: HF-format safetensors."""
    import lora

    cfg, d = run.cfg, run.d
    export_dtype = torch.bfloat16 if precision_dtype(cfg, d) == torch.bfloat16 else torch.float32
    if cfg.use_lora:
        adapter = _full_trainable(run)
        if d.main:
            lora.save_adapter(adapter, run.lcfg, folder, base_model_name_or_path=base_model_ref(cfg),
                              tied_embeddings=bool(run.hf_config.get("tie_word_embeddings")))
        if cfg.save_merged:
            full = _full_model_state(run)
            if d.main:
                (folder / "merged").mkdir()
                ck.save_hf_weights(lora.merged_state_dict(full, run.lcfg), folder / "merged", run.hf_config,
                                   dtype=export_dtype)
                ck.copy_tokenizer_files(Path(cfg.model_name_or_path), folder / "merged")
    else:
        full = _full_model_state(run)
        if d.main:
            ck.save_hf_weights(full, folder, run.hf_config, dtype=export_dtype)


def write_less_optimizer(run: Run, folder: Path) -> None:
    """optimizer.bin keyed by PeftModel parameter names (what LESS's get_info reads)."""
    import lora

    moments = {}
    for n, p in run.named:
        st = run.optim.state.get(p, {})
        full = {k: (v.full_tensor() if _is_dtensor(v) else v).detach().cpu() for k, v in st.items()
                if k in ("exp_avg", "exp_avg_sq", "step")}
        moments[lora.peft_param_name(n)] = full
    if run.d.main:
        g = run.optim.param_groups[0]
        ck.save_less_optimizer(folder / "optimizer.bin", moments, g["lr"], tuple(g["betas"]), g["eps"],
                               g["weight_decay"])


def save_checkpoint(run: Run, reason: str) -> Path | None:
    """Atomic save of the current step (every rank calls it). Returns the folder (rank 0) or None."""
    cfg, d, st = run.cfg, run.d, run.st
    if st.step in run.saved:
        return None
    name = ck.checkpoint_name(st.step, cfg.less_compat)
    t0 = time.time()
    tmp = ck.begin(run.job_dir, name) if d.main else ck.tmp_path(run.job_dir, name)
    barrier(d)
    tensors, sharded, shapes = collect_state(run.named, run.optim, d)
    ck.save_state_shard(tmp, tensors, sharded, shapes, d.rank, d.world)
    write_weights(run, tmp)
    if cfg.less_compat and cfg.use_lora:
        write_less_optimizer(run, tmp)
    loader_states = all_gather_object(run.data.train.state_dict(), d)
    if d.main:
        ck.copy_tokenizer_files(Path(cfg.model_name_or_path), tmp)
        trainer_state = {
            "step": st.step, "epoch": st.step / run.data.updates_per_epoch, "total_steps": run.data.total_steps,
            "world_size": d.world, "template": cfg.template, "reason": reason,
            "base_model_name_or_path": base_model_ref(cfg), "use_lora": cfg.use_lora,
            "schedule": dataclasses.asdict(run.sched),
            "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in run.optim.param_groups]},
            "loader": loader_states, "train": dataclasses.asdict(st), "metrics": run.last_eval,
            "data_cache_dir": str(run.data.cache_root), "config": dataclasses.asdict(cfg), "versions": versions(),
        }
        ck.write_json(tmp / ck.TRAINER_STATE, trainer_state)
    barrier(d)
    _test_kill(st.step, during_save=True)
    final = None
    if d.main:
        final = ck.commit(run.job_dir, tmp, name)
        protect = {name, ck.best_target(run.job_dir) or ""}
        removed = ck.prune(run.job_dir, cfg.save_total_limit, protect)
        run.log(f"saved {name} ({reason}, {time.time() - t0:.1f}s)"
                + (f"; removed {', '.join(removed)}" if removed else ""))
    barrier(d)
    run.saved.add(st.step)
    return final


def resume(run: Run, where: str) -> bool:
    """Restore the newest complete checkpoint (`auto`) or `where`; False when `auto` finds none."""
    d = run.d
    if where == "auto":  # rank 0 verifies (sha256 of every file), the others take its answer
        path, notes = broadcast_object(ck.find_resumable(run.job_dir) if d.main else None, d)
        for n in notes:
            run.log(n)
        if path is None:
            if d.main:
                _set_aside_unresumable(run)
            barrier(d)
            return False
    else:
        path = Path(where)
        reason = broadcast_object((ck.verify(path) if path.is_dir() else "no such folder") if d.main else None, d)
        if reason:
            raise SystemExit(f"error: --resume_from_checkpoint {where}: not a complete checkpoint ({reason})")
    meta, exact = restore_state(path, run.named, run.optim, d)
    saved_world = meta["world_size"]
    import data

    try:  # the loader state is (epoch, rows consumed): it re-splits over another number of ranks
        run.data.train.load_state_dict(meta["loader"][0])
    except data.DataError as e:
        raise SystemExit(f"error: cannot resume the data loader from {path} (written by {saved_world} ranks, "
                         f"this run has {d.world}): {e}") from None
    run.st = TrainState(**meta["train"])
    run.sched.scale = run.st.lr_scale
    run.last_eval = meta.get("metrics") or {}
    run.saved.add(run.st.step)
    run.log.truncate_metrics(run.st.step)
    run.log(f"resumed from {path} at step {run.st.step}"
            + ("" if exact else f" (written by {saved_world} ranks: model and optimizer restored, RNG reseeded,"
                                 " so the continuation is not bitwise identical)"))
    return True


def _set_aside_unresumable(run: Run) -> None:
    """`auto` found nothing to resume: damaged checkpoints (and the metrics and links that belong to them)
    move into a `damaged-<time>/` folder, named in the log; a run that saved nothing loses its metrics."""
    job = run.job_dir
    damaged = [p.name for _, p in ck.list_checkpoints(job)] + [p.name for p in job.glob(".tmp-checkpoint-*")]
    if damaged:
        names = damaged + [n for n in ("metrics.jsonl", ck.LATEST, ck.BEST)
                           if (job / n).exists() or (job / n).is_symlink()]
        dest = ck.move_aside(job, names)
        run.log(f"--resume_from_checkpoint auto: no complete checkpoint in {job}; moved {', '.join(names)} "
                f"into {dest} (nothing deleted) and starting fresh with a new metrics.jsonl")
    else:
        run.log(f"--resume_from_checkpoint auto: no checkpoint in {job}; starting fresh")
        run.log.truncate_metrics(0)


# ============================================================================= 5. loop

def _autocast(run: Run):
    """Single-process bf16 full fine-tuning computes under autocast (FSDP2 uses its mp_policy instead,
    and LoRA keeps the frozen base in bf16 already; LoRA with --lora_modules_to_save has fp32 embeddings/norms
    next to the bf16 base, so it uses autocast too)."""
    mixed = not run.cfg.use_lora or bool(run.cfg.lora_modules_to_save)
    on = run.d.world == 1 and mixed and precision_dtype(run.cfg, run.d) == torch.bfloat16
    return torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=on)


def forward_loss_sum(run: Run, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies of one micro-batch (labels are pre-shifted by packing.py).

    With --loss_chunk_tokens N > 0 only the completion positions go through lm_head, N at a time, through
    model.linear_cross_entropy (gradients computed in the forward pass, chunk by chunk) or, when the head is
    LoRA-targeted, checkpointed chunks: either way the [tokens, vocab] logits never exist at once."""
    from data import IGNORE_INDEX

    b = {k: v.to(run.d.device, non_blocking=True) for k, v in batch.items()}
    chunk = run.cfg.loss_chunk_tokens
    with _autocast(run):
        out = run.model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                        return_hidden=chunk > 0)
    if chunk <= 0:
        loss = F.cross_entropy(out.float().flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss, int(b["real_tokens"].sum())  # real (non-pad) tokens
    keep = b["labels"] != IGNORE_INDEX
    h, y = out[keep], b["labels"][keep]
    loss = out.sum().float() * 0.0  # keeps every rank's backward (and FSDP's reductions) alive on empty batches
    head = run.model.lm_head
    if type(head) is torch.nn.Linear and head.bias is None and not _is_dtensor(head.weight):
        with _autocast(run):  # the matmul dtype autocast would use
            cdt = torch.bfloat16 if torch.is_autocast_enabled(run.d.device.type) else head.weight.dtype
        from model import linear_cross_entropy

        loss = loss + linear_cross_entropy(h, head.weight, y, chunk, cdt)  # fused: no recompute in backward
        return loss, int(b["real_tokens"].sum())
    for i in range(0, len(y), chunk):  # a LoRA-targeted head: checkpointed chunks through the module
        loss = loss + checkpoint(_ce_chunk, run, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return loss, int(b["real_tokens"].sum())  # real (non-pad) tokens


def _ce_chunk(run: Run, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with _autocast(run):
        logits = run.model.lm_head(h)
    return F.cross_entropy(logits.float(), y, reduction="sum")


def _set_grad_sync(run: Run, on: bool) -> None:
    if run.d.world > 1:
        run.model.set_requires_gradient_sync(on)


def train_step(run: Run, micro: list[dict]) -> dict:
    """One optimizer step over `micro` (this rank's micro-batches). Returns the logged numbers."""
    from data import IGNORE_INDEX

    d, cfg = run.d, run.cfg
    n_labels = torch.tensor([float(sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro))], device=d.device)
    denom = float(all_reduce(n_labels, d).item())
    loss_sum = torch.zeros((), device=d.device)
    tokens = 0
    for i, m in enumerate(micro):
        _set_grad_sync(run, i == len(micro) - 1)
        ls, ntok = forward_loss_sum(run, m)
        # FSDP averages gradients over ranks; x world turns that average into the sum we want (gloo has no
        # PREMUL_SUM, so set_gradient_divide_factor(1.0) is not an option there).
        (ls * (d.world / max(denom, 1.0))).backward()
        loss_sum += ls.detach()
        tokens += ntok
    loss = float(all_reduce(loss_sum, d).item()) / max(denom, 1.0)
    params = [p for _, p in run.named]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float((norm.full_tensor() if _is_dtensor(norm) else norm).item())
    lr = run.sched(run.st.step)
    ok = math.isfinite(loss) and math.isfinite(norm) and denom > 0
    if ok:
        for g in run.optim.param_groups:
            g["lr"] = lr * g.get("lr_ratio", 1.0)
        run.optim.step()
    run.optim.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": norm, "lr": lr, "ok": ok, "label_tokens": int(denom),
            "tokens": int(all_reduce(torch.tensor([float(tokens)], device=d.device), d).item())}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Validation loss (mean over completion tokens) and, optionally, greedy accuracy via evalmath."""
    d, cfg = run.d, run.cfg
    out: dict = {}
    run.model.eval()
    if run.data.valid is not None:
        v = run.data.valid
        n = min(cfg.eval_max_batches, v.steps_in_epoch(0))
        tot = torch.zeros(2, device=d.device)
        for s in range(n):
            batch = v.batch(0, s)
            ls, _ = forward_loss_sum(run, batch)
            from data import IGNORE_INDEX

            tot += torch.stack([ls.float(), torch.tensor(float((batch["labels"] != IGNORE_INDEX).sum()),
                                                         device=d.device)])
        all_reduce(tot, d)
        if tot[1] > 0:
            out["eval_loss"] = float(tot[0] / tot[1])
    if cfg.eval_accuracy_samples > 0:
        out.update(_eval_accuracy(run))
    run.model.train()
    return out


def _eval_accuracy(run: Run) -> dict:
    """Greedy-decode a fixed validation subset with evalmath's decoding and grader. Under FSDP every
    rank first gathers the full (bf16/fp32) weights so ranks can run different numbers of forwards."""
    import data
    import evalmath  # lazy: evalmath never imports sft

    path = run.data.cache_root / "records" / "valid.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()][: run.cfg.eval_accuracy_samples]
    records = [r for r in records if r.get("answer")]
    if not records:
        return {}
    tok = data.load_tokenizer(run.cfg.model_name_or_path)
    fsdp_mods = [m for m in run.model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for m in fsdp_mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        with _autocast(run):
            _, summary = evalmath.evaluate_records(
                run.model, tok, records, template=run.cfg.template,
                dataset=evalmath.guess_grader_dataset(records), max_new_tokens=run.cfg.eval_max_new_tokens)
    finally:
        for m in fsdp_mods:
            m.reshard()
            m.set_reshard_after_forward(True)
    acc = summary.get("accuracy", summary.get("acc"))
    return {"eval_accuracy": float(acc)} if acc is not None else {}


def _is_better(metric: str, value: float, best: float | None) -> bool:
    return best is None or (value < best if metric == "loss" else value > best)


def handle_eval(run: Run) -> bool:
    """Evaluate, track the best checkpoint (saved and linked as checkpoint-best). True: stop early."""
    cfg, st = run.cfg, run.st
    res = evaluate(run)
    if not res:
        return False
    run.last_eval = {"step": st.step, **res}
    run.log.metrics({"step": st.step, **res})
    run.log(f"eval step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    key = "eval_loss" if cfg.metric_for_best == "loss" else "eval_accuracy"
    if key not in res:
        return False
    if _is_better(cfg.metric_for_best, res[key], st.best_metric):
        st.best_metric, st.best_step, st.evals_since_best = res[key], st.step, 0
        if cfg.save_strategy != "no":
            save_checkpoint(run, "best")
            if run.d.main and _exists(run, st.step):
                ck.set_best(run.job_dir, ck.checkpoint_name(st.step, cfg.less_compat))
                run.log(f"new best {key} {res[key]:.4f} at step {st.step} -> {ck.BEST}")
    else:
        st.evals_since_best += 1
    return bool(cfg.early_stopping_patience and st.evals_since_best >= cfg.early_stopping_patience)


def _exists(run: Run, step: int) -> bool:
    return (run.job_dir / ck.checkpoint_name(step, run.cfg.less_compat)).is_dir()


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, save, exit cleanly (a second SIGINT interrupts)."""

    def __init__(self):
        self.raised = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def agreed(self, d: Dist) -> bool:
        t = torch.tensor([1.0 if self.raised else 0.0], device=d.device)
        return bool(all_reduce(t, d, dist.ReduceOp.MAX if d.world > 1 else None).item() > 0)


def roll_back(run: Run) -> bool:
    """Loss spike: reload the newest checkpoint and continue with the learning rate scaled down."""
    st = run.st
    if st.backoffs >= run.cfg.max_backoffs:
        raise SystemExit(f"error: loss spike at step {st.step} after {st.backoffs} back-offs "
                         f"(--max_backoffs); the last good checkpoint is kept in {run.job_dir}")
    path, _ = broadcast_object(ck.find_resumable(run.job_dir, check_hashes=False) if run.d.main else None, run.d)
    if path is None:
        run.log(f"loss spike at step {st.step} but no checkpoint to roll back to; continuing")
        return False
    backoffs, scale = st.backoffs + 1, st.lr_scale * run.cfg.backoff_lr_scale
    run.saved.clear()
    resume(run, str(path))
    run.st.backoffs, run.st.lr_scale = backoffs, scale
    run.sched.scale = scale
    run.log(f"loss spike: rolled back to {path.name} (step {run.st.step}), lr scaled to {scale:g} x peak "
            f"(back-off {backoffs}/{run.cfg.max_backoffs})")
    return True


def _is_spike(run: Run, loss: float) -> bool:
    h = run.st.loss_history
    w = run.cfg.spike_window
    return run.cfg.spike_factor > 0 and len(h) >= w and loss > run.cfg.spike_factor * statistics.median(h[-w:])


def should_save(run: Run) -> bool:
    cfg, step = run.cfg, run.st.step
    if step >= run.data.total_steps:
        return True
    if cfg.save_strategy == "steps":
        return step % cfg.save_steps == 0
    if cfg.save_strategy == "epoch":
        return step in run.data.epoch_end_steps
    return False


def train_loop(run: Run) -> None:
    stop = StopFlag()
    run.model.train()
    try:
        _loop(run, stop)
    finally:
        stop.restore()


def _loop(run: Run, stop: StopFlag) -> None:
    cfg, d, data = run.cfg, run.d, run.data
    accum = cfg.gradient_accumulation_steps
    stream = _stream(data.train)
    t_start, step_start = time.time(), run.st.step
    while run.st.step < data.total_steps:
        st = run.st
        t0 = time.time()
        res = train_step(run, [next(stream) for _ in range(accum)])
        st.step += 1
        if res["label_tokens"] == 0:
            st.skipped_steps += 1
            run.log(f"step {st.step}: no completion tokens in this batch (all truncated away?): update skipped")
        elif not res["ok"]:
            st.bad_in_row += 1
            st.skipped_steps += 1
            run.log(f"step {st.step}: non-finite loss {res['loss']} or grad norm {res['grad_norm']}: update "
                    f"skipped ({st.bad_in_row} in a row, {st.skipped_steps} in all)")
            if st.bad_in_row >= cfg.max_bad_steps:
                raise SystemExit(f"error: {st.bad_in_row} non-finite steps in a row (--max_bad_steps); stopping. "
                                 f"The last good checkpoint is in {run.job_dir} ({ck.LATEST}). Lower "
                                 f"--learning_rate, check the data, or use --precision fp32.")
        else:
            st.bad_in_row = 0
            if _is_spike(run, res["loss"]) and roll_back(run):
                stream = _stream(data.train)
                continue
            st.loss_history = (st.loss_history + [res["loss"]])[-max(cfg.spike_window, 1):]
        st.tokens_seen += res["tokens"]
        dt = time.time() - t0
        if st.step % cfg.logging_steps == 0 or st.step == data.total_steps:
            done = st.step - step_start
            eta = (time.time() - t_start) / max(done, 1) * (data.total_steps - st.step)
            run.log(f"step {st.step}/{data.total_steps} | loss {res['loss']:.4f} | lr {res['lr']:.3e} | "
                    f"grad norm {res['grad_norm']:.3f} | {res['tokens'] / dt:,.0f} tok/s | "
                    f"epoch {st.step / data.updates_per_epoch:.2f} | ETA {_fmt_time(eta)}")
            run.log.metrics({"step": st.step, "loss": res["loss"], "lr": res["lr"], "grad_norm": res["grad_norm"],
                             "tokens": res["tokens"], "tokens_per_s": res["tokens"] / dt,
                             "label_tokens": res["label_tokens"],
                             "epoch": st.step / data.updates_per_epoch})
        _test_kill(st.step, during_save=False)
        early = cfg.eval_steps > 0 and (st.step % cfg.eval_steps == 0 or st.step == data.total_steps) \
            and handle_eval(run)
        stopping = stop.agreed(d)
        if early or stopping or should_save(run):  # should_save: the strategy, and always the last step
            save_checkpoint(run, "signal" if stopping else "early stop" if early else "interval")
        if stopping or early:
            run.log(("stopping on a signal" if stopping else "early stopping") + f" at step {st.step}")
            return


def _stream(loader):
    while True:
        yield from loader


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ============================================================================= 6. dry run

def memory_estimate(hf_config: dict, n_total: int, n_train: int, cfg: Config, world: int, lora_mode: bool) -> dict:
    """Rough bytes per GPU under FSDP2 with bf16 compute: sharded weights/grads/AdamW state, the
    all-gathered bf16 blocks in flight, activations of one micro-batch, and the logits."""
    h, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    layers, vocab = hf_config["num_hidden_layers"], hf_config["vocab_size"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    kv_dim = kv * (hf_config.get("head_dim") or h // heads)
    tokens = cfg.per_device_train_batch_size * cfg.max_seq_length
    weights = ((n_total - n_train) * 2 + n_train * 4) if lora_mode else n_total * 4  # frozen bf16, master fp32
    block = (4 * h * h + 3 * h * inter) * 2  # one block's bf16 working copy (approx.)
    per_layer_act = tokens * 2 * (7 * h + 2 * kv_dim + 4 * inter)  # bf16 tensors saved for backward
    acts = (tokens * h * 2 * layers + per_layer_act) if cfg.activation_checkpointing else per_layer_act * layers
    return {
        "weights": weights / world + (2 * block if world > 1 else 0),
        "grads": n_train * 4 / world,
        "optimizer": n_train * 8 / world,
        "activations": acts,
        # bf16 logits, fp32 copy for the loss, fp32 grad; with chunking only one chunk exists at a time
        "logits": (min(tokens, cfg.loss_chunk_tokens) if cfg.loss_chunk_tokens > 0 else tokens) * vocab * 10,
    }


def dry_run(cfg: Config, d: Dist) -> None:
    import lora

    hf = read_model_config(cfg.model_name_or_path, allow_known=True)
    world = cfg.dry_run_world_size or d.world
    rows = []
    for lora_mode in (True, False):
        c = dataclasses.replace(cfg, use_lora=lora_mode)
        model, _ = build_model(c, Dist(), hf)  # meta device: nothing is allocated
        n_train, n_total = lora.count_parameters(model)
        rows.append((lora_mode, n_total, n_train, memory_estimate(hf, n_total, n_train, c, world, lora_mode)))
    gib = 2**30
    print(f"model {cfg.model_name_or_path} ({hf.get('model_type')}, {hf['num_hidden_layers']} layers, "
          f"hidden {hf['hidden_size']}, vocab {hf['vocab_size']})")
    print(f"batch {cfg.per_device_train_batch_size} x {cfg.max_seq_length} tokens per GPU, {world} GPU(s), "
          f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
          f"LoRA r={cfg.lora_r} on {','.join(cfg.lora_target_modules)}")
    print(f"{'mode':<6} {'total params':>14} {'trainable':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
          f"{'activ.':>8} {'logits':>8} {'total GiB':>10}")
    for lora_mode, n_total, n_train, mem in rows:
        print(f"{'lora' if lora_mode else 'full':<6} {n_total:>14,} {n_train:>14,} "
              + " ".join(f"{mem[k] / gib:>8.2f}" for k in ("weights", "grads", "optimizer", "activations", "logits"))
              + f" {sum(mem.values()) / gib:>10.2f}")
    print("(estimate: bf16 compute, fp32 master weights and AdamW state, FSDP2-sharded over the GPUs; "
          "add ~1-2 GiB of CUDA context and allocator slack)")


# ============================================================================= 7. main

def setup(cfg: Config, d: Dist, notes: list[str]) -> Run:
    job_name = cfg.job_name or default_job_name(cfg)
    cfg = dataclasses.replace(cfg, job_name=job_name)
    job_dir = Path(cfg.output_dir) / job_name
    hf_config = read_model_config(cfg.model_name_or_path)
    log_notes = _on_rank0(d, lambda: _lock_and_prepare(cfg, job_dir))
    log = RunLog(cfg, job_dir, d)
    for n in log_notes + notes + check_config(cfg):
        log(n)
    log("config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2))
    if d.main:
        ck.write_json(job_dir / "config.json", {**dataclasses.asdict(cfg), "_versions": versions(),
                                                "_world_size": d.world, "_argv": sys.argv[1:]})
    log.start_reporting(cfg, job_name)
    model, lcfg = build_model(cfg, d, hf_config)
    load_weights(model, cfg, d)
    named = trainable(model)
    optim = build_optimizer(cfg, named, d)
    data = build_data(cfg, d, log)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * data.total_steps)
    sched = Schedule(cfg.learning_rate, data.total_steps, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio)
    import lora

    n_train, n_total = lora.count_parameters(model)
    parallel = (f"FSDP2 over {d.world} ranks ({'nccl' if d.device.type == 'cuda' else 'gloo'})" if d.world > 1
                else f"single process on {d.device}")
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * d.world
    unit = f"packed rows of {cfg.max_seq_length} tokens" if cfg.packing else "examples (padded to the longest)"
    log(f"{parallel}; precision {precision_dtype(cfg, d)}; {'LoRA' if cfg.use_lora else 'full fine-tuning'}: "
        f"{n_train:,} trainable of {n_total:,} parameters"
        + (f" (adapters + modules_to_save {' '.join(cfg.lora_modules_to_save)})"
           if cfg.use_lora and cfg.lora_modules_to_save else ""))
    log(f"optimizer step = {cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accum x "
        f"{d.world} ranks = {rows} {unit}"
        + (f" = {rows * cfg.max_seq_length:,} tokens per optimizer step" if cfg.packing else
           f" (at most {rows * cfg.max_seq_length:,} tokens per optimizer step)"))
    log(f"{data.total_steps} optimizer steps ({data.updates_per_epoch} per epoch; epochs end at steps "
        f"{data.epoch_end_steps[:8]}); warmup {warmup}; data cache {data.cache_root}")
    return Run(cfg, d, job_dir, log, model, lcfg, hf_config, named, optim, data, sched)


def _lock_and_prepare(cfg: Config, job_dir: Path) -> list[str]:
    job_dir.mkdir(parents=True, exist_ok=True)
    note = ck.acquire_lock(job_dir)
    try:
        prepare_job_dir(cfg, job_dir)
    except SystemExit:
        ck.release_lock(job_dir)
        raise
    return [note] if note else []


def _on_rank0(d: Dist, fn):
    """Run `fn` on rank 0; every rank returns its result or raises its SystemExit."""
    result = None
    if d.main:
        try:
            result = ("ok", fn())
        except SystemExit as e:
            result = ("exit", str(e))
    result = broadcast_object(result, d)
    if result[0] == "exit":
        raise SystemExit(result[1])
    return result[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> None:
    cfg, notes = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.dry_run:
        dry_run(cfg, Dist())
        return
    d = init_distributed()
    seed_everything(cfg.seed)
    job_dir = Path(cfg.output_dir) / (cfg.job_name or default_job_name(cfg))
    try:
        run = setup(cfg, d, notes)
        if run.cfg.resume_from_checkpoint:
            resume(run, run.cfg.resume_from_checkpoint)
        if run.st.step >= run.data.total_steps:
            run.log(f"nothing to do: step {run.st.step} >= {run.data.total_steps} total steps")
        else:
            train_loop(run)
        if run.st.step >= run.data.total_steps and run.st.step not in run.saved:
            save_checkpoint(run, "final")
        run.log(f"done at step {run.st.step}; {run.st.skipped_steps} skipped steps; run folder {run.job_dir}")
        run.log.close()
    finally:
        if d.main:
            ck.release_lock(job_dir)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
