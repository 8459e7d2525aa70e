"""LESS compatibility for sft.py: LESS's HF-Trainer flag strings and its `optimizer.bin`.

    bash scripts/train/lora_train.sh "train.jsonl" models/llama-2-7b llama2-7b-lora   # LESS's flags, verbatim

`translate(argv, native)` turns the flags of LESS's `less/scripts/train/base_training_args.sh`
(transformers 4.36 HfArgumentParser) into sft.py's native flags; `write_optimizer` writes the name-keyed
Adam moments that LESS's get_info reads (docs/checkpoints.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cli import UserError, did_you_mean, parse_bool

# LESS/HF flag -> native. A string names the native flag; None marks a flag accepted without effect (listed
# once in the log); a callable maps the raw values to a list of native (flag, values) pairs.
_NOOP = None


def _fp16(v: list[str]) -> list:
    if parse_bool(v):
        raise UserError("error: --fp16 True is not supported (use --bf16 True, or drop the flag)")
    return []


def _optim(v: list[str]) -> list:
    if v and v[0] not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        raise UserError(f"error: --optim {v[0]}: only AdamW is implemented (adamw_torch); change the flag")
    return []


FLAGS: dict[str, Any] = {
    "do_train": _NOOP, "use_fast_tokenizer": _NOOP, "evaluation_strategy": _NOOP, "eval_strategy": _NOOP,
    "tf32": _NOOP, "overwrite_cache": _NOOP, "preprocessing_num_workers": _NOOP, "data_seed": _NOOP,
    "fsdp": _NOOP, "fsdp_config": _NOOP, "config_name": _NOOP, "tokenizer_name": _NOOP, "cache_dir": _NOOP,
    "model_revision": _NOOP, "use_auth_token": _NOOP, "torch_dtype": _NOOP, "analysis_mode": _NOOP,
    "analysis_dataset": _NOOP, "train_dataset_names": _NOOP, "ddp_find_unused_parameters": _NOOP,
    "remove_unused_columns": _NOOP, "dataloader_num_workers": _NOOP,
    "lora": "use_lora", "gradient_checkpointing": "activation_checkpointing",
    "bf16": lambda v: [("precision", ["auto"])] if parse_bool(v) else [("precision", ["fp32"])],
    "fp16": _fp16,
    "optim": _optim,
    "output_dir": lambda v: [("output_dir", [str(Path(v[0]).parent)]), ("job_name", [Path(v[0]).name])],
}
DEFAULTS = {"less_compat": ["true"], "packing": ["false"], "template": ["tulu"], "save_total_limit": ["0"],
            "lr_scheduler_type": ["linear"], "warmup_ratio": ["0.03"], "learning_rate": ["2e-05"],
            "num_train_epochs": ["4"], "save_strategy": ["epoch"], "use_lora": ["false"],
            "valid_fraction": ["0"]}  # LESS trains on every example of --train_files


def is_less_argv(argv: list[str]) -> bool:
    return any(a in ("--do_train", "--lora", "--less") or a.startswith(("--do_train=", "--lora="))
               for a in argv)


def translate_if_less(argv: list[str], native: set[str]) -> tuple[list[str], list[str]]:
    """(argv, notes): a LESS flag string translated to native flags (notes say so), other argv unchanged."""
    if not is_less_argv(argv):
        return argv, []
    argv, ignored = translate(argv, native)
    notes = ["LESS flags translated to: " + " ".join(argv)]
    if ignored:
        notes.append("LESS/HF flags accepted without effect here: " + ", ".join(f"--{n}" for n in ignored))
    return argv, notes


def _group_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    groups: list[tuple[str, list[str]]] = []
    for a in argv:
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            groups.append((name.replace("-", "_"), [val] if eq else []))
        elif groups:
            groups[-1][1].append(a)
        else:
            raise UserError(f"error: unexpected positional argument {a!r} (every option is a --flag)")
    return groups


def translate(argv: list[str], native: set[str]) -> tuple[list[str], list[str]]:
    """LESS/HF flag list -> (native argv, names of flags accepted without effect). `native` holds sft.py's
    flag names. The last occurrence of a repeated flag wins (argparse semantics); `--less` alone switches
    LESS mode on."""
    last: dict[str, list[str]] = {}
    for name, vals in _group_flags(argv):
        last.pop(name, None)  # re-insert so the order is that of the last occurrence
        last[name] = vals
    last.pop("less", None)
    out: dict[str, list[str]] = dict(DEFAULTS)
    ignored = []
    for name, vals in last.items():
        rule = FLAGS.get(name, name if name in native or name == "config" else False)
        if rule is False:
            raise UserError(f"error: unknown flag --{name} (LESS mode){did_you_mean(name, [*native, *FLAGS], True)}")
        if rule is None:
            ignored.append(name)
        elif isinstance(rule, str):
            out[rule] = vals
        else:
            out.update(dict(rule(vals)))
    if "per_device_train_batch_size" in last and "packing" not in last:
        out["packing"] = ["false"]
    return [tok for k, v in out.items() for tok in (f"--{k}", *v)], ignored


def write_optimizer(path: Path, named: list[tuple[str, torch.nn.Parameter]], optim: torch.optim.Optimizer,
                    write: bool) -> None:
    """LESS's `optimizer.bin`: `{"state": {peft_name: {"exp_avg", "exp_avg_sq", "step"}}, "param_groups"}` keyed
    by the live PeftModel parameter names (with `.default.`), full (unsharded) contiguous CPU tensors. LESS's
    get_info reads only state[name]["exp_avg"/"exp_avg_sq"]. Every rank calls (gathers shards); `write` on one."""
    import lora

    state = {}
    for n, p in named:
        st = optim.state.get(p, {})
        state[lora.peft_param_name(n)] = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in st.items() if k in ("exp_avg", "exp_avg_sq", "step")}
    if write:
        g = optim.param_groups[0]
        groups = [{"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"],
                   "params": list(state)}]
        torch.save({"state": state, "param_groups": groups}, str(path))
