"""Supervised fine-tuning (LoRA or full) of a Llama-family model on math data, in plain torch.

    python sft.py --config configs/train_lora.yaml --model_name_or_path models/Qwen2.5-0.5B
    torchrun --nproc_per_node=8 sft.py --use_lora --datasets gsm8k math --job_name qwen-lora
    python sft.py --dry_run --model_name_or_path Qwen/Qwen2.5-1.5B         # params + memory, no weights (dryrun.py)
    bash scripts/train/lora_train.sh "train.jsonl" models/llama-2-7b llama2-7b-lora   # LESS's flags (less.py)

Read top to bottom: config; distributed setup; model, optimizer, schedule, data; the loss (mean over all completion
tokens of the global batch); evaluation; the loop (`train`: step, log, evaluate, save, stop); `main`. Elsewhere:
checkpoint.py (run folder, train state, save/resume), runlog.py (console, logs, Ctrl-C), cli.py, less.py, dryrun.py.

On a GPU a step has no host sync: counts and trained positions come from the CPU batch (packing.py), batches are
copied non_blocking from pinned memory with the next one in flight, one all-reduce of [loss, tokens, labels, stop]
normalises the gradients, the fused AdamW skips a non-finite step on the device; numbers are read (one `.tolist()`)
at logging, evaluation and save steps only. --compile (default on CUDA) compiles each decoder block once (fixed row
length, document boundaries as data).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint as ck
import data
import less
import lora
import model as M
import packing
from cli import Bool, UserError, parse_config, run_main
from data import IGNORE_INDEX
from model import head_loss_sum
from runlog import RunLog, StopFlag, log_setup, log_step, read_step

# ============================================================================= config

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Config:
    """mathsft SFT. YAML files (--config, repeatable) give defaults; flags override them."""

    # --- model
    model_name_or_path: str = "models/Qwen2.5-0.5B"  # local HF folder (config.json, safetensors, tokenizer)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    activation_checkpointing: Bool = False  # recompute each block in backward (less memory, ~30% slower)
    activation_checkpointing_every: int = 1  # with activation checkpointing: only every k-th block (0, k, 2k, ...)
    compile: Bool | None = None  # torch.compile each decoder block; default: on with CUDA, off on CPU
    attn_impl: str = "auto"  # model.py attention: auto (CPU per_doc, CUDA varlen) | per_doc | varlen | flex
    loss_chunk_tokens: int = 1024  # lm_head + loss over completion tokens only, in recomputed chunks (0: off)
    # --- LoRA (--use_lora false: full fine-tuning)
    use_lora: Bool = True  # LoRA (base frozen, adapters trained); false: full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA scaling = alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA branch input
    lora_target_modules: tuple[str, ...] = LORA_TARGETS  # linear layers that get adapters (names end with these)
    # PEFT's modules_to_save: whole modules (names ending with e.g. embed_tokens lm_head norm) trained next to LoRA
    lora_modules_to_save: tuple[str, ...] = ()  # modules trained whole and saved in the adapter (not in LESS mode)
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): the B matrices learn at this multiple of the lr
    save_merged: Bool = False  # LoRA: also write the merged model (HF format) into each checkpoint/merged/
    # --- data (data.DataConfig: data_config below; see docs/data.md)
    datasets: tuple[str, ...] = ("gsm8k",)  # names (gsm8k, math) or jsonl paths
    train_files: tuple[str, ...] = ()  # jsonl files; when given they replace --datasets
    data_dir: str = "data/raw"  # holds <name>/{train,test}.jsonl for named datasets
    template: str = "boxed"  # data/prompts/<name>.json; recorded in every checkpoint
    max_seq_length: int = 1024  # packed row length (and truncation length)
    packing: Bool = True  # pack documents into rows; false: one example per row, HF-style batches
    truncation: Literal["truncate", "drop"] = "truncate"  # examples longer than max_seq_length
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
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "cosine"  # decay after the warmup
    warmup_ratio: float = 0.03  # warmup steps as a fraction of all steps
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of the peak
    weight_decay: float = 0.0  # not applied to biases and norm weights
    adam_beta1: float = 0.9  # AdamW betas/eps (LESS assumes 0.9, 0.999, 1e-8)
    adam_beta2: float = 0.999  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW eps
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
    checksum: Bool = False  # sha256 of every checkpoint file in manifest.json, verified on resume (sizes always)
    save_steps: int = 100  # checkpoint every N steps with --save_strategy steps
    save_total_limit: int = 3  # interval checkpoints kept (0: all); best is kept in addition
    less_compat: Bool = False  # LESS layout: checkpoint-{step}, optimizer.bin (set by LESS flags)
    seed: int = 0  # model init (adapters), data order, dropout
    # --- evaluation
    eval_steps: int = 200  # evaluate every N steps and at the last step (0: no evaluation during training)
    eval_max_batches: int = 50  # validation-loss batches per evaluation
    eval_accuracy_samples: int = 0  # > 0: also greedy-decode this many validation problems (evalmath)
    eval_max_new_tokens: int = 512  # decoding budget for in-training accuracy
    metric_for_best: Literal["loss", "accuracy"] = "loss"  # what checkpoint-best means
    early_stopping_patience: int = 0  # stop after N evaluations without a new best (0: off)
    # --- guards
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    # --- logging and misc
    logging_steps: int = 1  # progress line + metrics.jsonl every N steps
    log_file: Bool = True  # also write the progress lines to <run>/train.log (false: a wrapper tees them there)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # if installed; else a notice
    logging_dir: str = "logs"  # TensorBoard events go to <logging_dir>/<job_name>/
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    deterministic: Bool = False  # torch.use_deterministic_algorithms
    dry_run: Bool = False  # build on the meta device, print parameters and a memory estimate, exit
    dry_run_world_size: int = 0  # GPUs to assume in the memory estimate (0: the current world size)


# data.DataConfig's fields that have another name here; the others share their name with a Config field
DATA_NAMES = {"seed": "data_seed", "sample_seed": "sample_data_seed", "out_dir": "data_cache_dir",
              "tokenizer": "model_name_or_path"}


def data_config(cfg: Config) -> data.DataConfig:
    """The data flags as data.prepare takes them (--train_files, when given, replace --datasets)."""
    kw = {f.name: getattr(cfg, DATA_NAMES.get(f.name, f.name)) for f in dataclasses.fields(data.DataConfig)}
    return data.DataConfig(**{**kw, "datasets": cfg.train_files or cfg.datasets})


def parse_args(argv: list[str]) -> tuple[Config, list[str]]:
    """argv -> (Config, notes): LESS flag strings translated (less.py), `--config` YAML files as defaults, flags."""
    argv, notes = less.translate_if_less(argv, {f.name for f in dataclasses.fields(Config)})
    data_keys = {**DATA_NAMES, "tokenizer": None}  # a data.py YAML (has tokenizer or out_dir): the model's tokenizer
    cfg, files = parse_config(Config, argv, lambda raw: data_keys if "tokenizer" in raw or "out_dir" in raw else None)
    return cfg, notes + files


def check_config(cfg: Config) -> list[str]:
    """One error naming every impossible setting; returns warnings."""
    c, lora_on = cfg, cfg.use_lora
    rules = {**{n: (getattr(c, n) >= 1, ">= 1") for n in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                          "max_seq_length", "logging_steps", "max_bad_steps")},
             "warmup_ratio": (0 <= c.warmup_ratio <= 1, "in [0, 1]"),
             "learning_rate": (c.learning_rate > 0, "> 0 (e.g. 2e-4 for LoRA, 1e-5 for full fine-tuning)"),
             "valid_fraction": (0 <= c.valid_fraction < 1, "in [0, 1)"), "percentage": (0 < c.percentage <= 1, "in (0, 1]"),
             "loraplus_lr_ratio": (c.loraplus_lr_ratio > 0, "> 0 (1: plain LoRA; LoRA+ uses ~16)"),
             "lora_r": (not lora_on or c.lora_r >= 1, ">= 1 (e.g. 8, 16, 64)"),
             "lora_alpha": (not lora_on or c.lora_alpha > 0, "> 0"),
             "lora_dropout": (not lora_on or 0 <= c.lora_dropout < 1, "in [0, 1)"),
             "save_steps": (c.save_strategy != "steps" or c.save_steps >= 1, ">= 1 with --save_strategy steps"),
             **{n: (getattr(c, n) >= 0, ">= 0") for n in ("warmup_steps", "max_steps", "eval_steps", "save_total_limit",
                                                          "eval_accuracy_samples", "early_stopping_patience")}}
    errors = [f"--{n} must be {want} (got {getattr(c, n)})" for n, (ok, want) in rules.items() if not ok]
    errors += [msg for bad, msg in (
        (c.max_steps <= 0 and c.num_train_epochs < 1, "give --num_train_epochs >= 1 or --max_steps > 0"),
        (c.metric_for_best == "accuracy" and c.eval_accuracy_samples <= 0 and c.eval_steps > 0,
         "--metric_for_best accuracy needs --eval_accuracy_samples N > 0"),
        (c.early_stopping_patience > 0 and not c.eval_steps, "--early_stopping_patience needs --eval_steps N > 0"),
        (c.less_compat and c.lora_modules_to_save, "--lora_modules_to_save is not available in LESS mode: LESS reads "
         "adapters without embedding/lm_head/norm weights and keys optimizer.bin by LoRA parameter names only")) if bad]
    if errors:
        raise UserError("error: " + "; ".join(errors))
    changed = [f.name for f in dataclasses.fields(Config)
               if (f.name.startswith("lora") or f.name == "save_merged") and getattr(cfg, f.name) != f.default]
    if not cfg.use_lora and changed and not cfg.less_compat:
        return [f"--use_lora false: LoRA-only settings have no effect: {', '.join('--' + n for n in changed)}"]
    return []


# ============================================================================= distributed

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: Any = None  # the 1-D device mesh FSDP2 shards over (world > 1)
    main = property(lambda self: self.rank == 0)


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python sft.py` runs as one process, no group."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(0, 1, device)
    from torch.distributed.device_mesh import init_device_mesh

    # generous timeout: rank 0 may tokenize a large dataset while the others wait at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ============================================================================= model, optimizer, schedule, data

def build_model(cfg: Config, d: Dist, hf_config: dict, dtype: torch.dtype):
    """Meta-device model -> LoRA injected (adapters fp32, base in the compute dtype) -> activation
    checkpointing -> FSDP2 per block + root (world > 1). Returns (model, lora_cfg or None)."""
    margs = M.ModelArgs.from_hf_config(hf_config)
    base_dtype = dtype if cfg.use_lora else torch.float32  # full FT: fp32 master weights
    model = M.Transformer.from_args(margs, device="meta", dtype=base_dtype, attn_impl=cfg.attn_impl)
    lcfg = None
    if cfg.use_lora:
        lcfg = lora.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=tuple(cfg.lora_target_modules),
                               modules_to_save=tuple(cfg.lora_modules_to_save))
        lora.inject_lora(model, lcfg, dtype=torch.float32)  # adapters and saved modules fp32, frozen base `dtype`
    model.set_activation_checkpointing(cfg.activation_checkpointing, every=cfg.activation_checkpointing_every)
    if (d.device.type == "cuda") if cfg.compile is None else cfg.compile:  # per block (the FSDP2 unit): one graph
        for block in model.model.layers:                                  # for all blocks, shapes fixed per run
            block.compile()
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == torch.bfloat16 else MixedPrecisionPolicy())
        for block in model.model.layers:
            fully_shard(block, mesh=d.mesh, mp_policy=mp)
        fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model, lcfg


def load_weights(model, cfg: Config, d: Dist) -> None:
    """Allocate on the device, load the base HF weights (each rank keeps its shard), init adapters."""
    model.to_empty(device=d.device)
    model.reset_buffers()
    model.load_hf_weights(cfg.model_name_or_path)  # DTensor parameters: each rank keeps its chunk, no collectives
    if cfg.use_lora:
        lora.reset_lora_parameters(model, seed=cfg.seed)


def build_optimizer(cfg: Config, named: list[tuple[str, torch.nn.Parameter]], d: Dist) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D ones (biases, norms). --loraplus_lr_ratio R != 1:
    the LoRA B matrices get their own group, lr R x the schedule's (the group's `lr_ratio`, applied every step)."""
    plus = cfg.use_lora and cfg.loraplus_lr_ratio != 1.0
    lora_b = [p for n, p in named if plus and ".lora_B" in n]
    decay = [p for _, p in named if p.ndim >= 2 and not any(p is b for b in lora_b)]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": lora_b, "weight_decay": cfg.weight_decay, "lr_ratio": cfg.loraplus_lr_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             fused=(d.device.type == "cuda") or None)


@dataclass
class Schedule:
    """Learning rate as a function of the optimizer step (HF's formulas: the update at step s uses
    lr(s), so with warmup the first update has lr 0, exactly as the HF Trainer)."""
    peak: float
    total: int
    warmup: int
    kind: str
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * step / max(1, self.warmup)
        if self.kind == "constant":
            return self.peak
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        f = max(0.0, 1 - progress) if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1, progress)))
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * f)


@dataclass
class Data:
    train: Any  # packing.PackedLoader
    valid: Any | None
    cache_root: Path
    updates_per_epoch: int
    total_steps: int
    epoch_end_steps: list[int]


def build_data(cfg: Config, d: Dist) -> Data:
    """data.prepare on rank 0 (the token cache, shared by every rank) -> packed loaders and the step plan."""
    try:  # rank 0 builds the cache, then every rank opens it
        train_dir = ck.on_rank0(d.main, lambda: data.prepare(data_config(cfg), "train"))
        loader_kw = dict(seq_len=cfg.max_seq_length, batch_size=cfg.per_device_train_batch_size, rank=d.rank,
                         world_size=d.world, seed=cfg.seed, packing=cfg.packing)
        train = packing.PackedLoader(train_dir, **loader_kw)
        valid_dir = train_dir.parent / "valid"
        valid = (packing.PackedLoader(valid_dir, **{**loader_kw, "seed": 0})
                 if cfg.eval_steps > 0 and (valid_dir / "tokens.npy").is_file() else None)
        total, per_epoch, ends = train.plan(cfg.gradient_accumulation_steps, cfg.num_train_epochs, cfg.max_steps)
    except data.DataError as e:
        raise UserError(f"error: {e}") from None
    train.set_epoch(0)
    return Data(train, valid, train_dir.parent, per_epoch, total, ends)


# ============================================================================= the loss

def autocast(run: Run):
    """bf16 autocast for a single process with fp32 trained weights next to bf16 ones (full fine-tuning, LoRA with
    --lora_modules_to_save); FSDP2 uses its mp_policy instead, plain LoRA's frozen base is bf16 already."""
    mixed = not run.cfg.use_lora or bool(run.cfg.lora_modules_to_save)
    on = run.d.world == 1 and mixed and run.dtype == torch.bfloat16
    return torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=on)


def loss_sum(run: Run, batch: dict) -> torch.Tensor:
    """Sum of token cross-entropies of one micro-batch (device tensor; labels pre-shifted, packing.py). The default
    --loss_chunk_tokens N > 0: lm_head + loss on completion tokens only, N at a time (model.head_loss_sum, the same
    loss). To try another loss, edit the plain branch and use --loss_chunk_tokens 0."""
    b = batch if batch["input_ids"].device == run.d.device else packing.to_device(batch, run.d.device)
    chunk = run.cfg.loss_chunk_tokens
    with autocast(run):
        out = run.model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                        cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], return_hidden=chunk > 0)
    if chunk > 0:
        return head_loss_sum(run.model.lm_head, out, b["labels"], chunk, autocast(run), IGNORE_INDEX, b["label_pos"])
    return F.cross_entropy(out.float().flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def train_step(run: Run, micro: list[dict]) -> dict:
    """One optimizer step over this rank's micro-batches, no host sync. FSDP averages gradients over ranks, so each
    backward uses loss_sum * world; the all-reduced label count then divides the gradients: the gradient of the mean
    over tokens (gloo has no PREMUL_SUM). A non-finite loss or norm, or no labels: no update (fused CUDA AdamW: on
    the device via found_inf; on CPU the flag is read). Returns device tensors; runlog.read_step reads them."""
    d, cfg = run.d, run.cfg
    stop = float(run.stop.raised) if run.stop else 0.0
    counts = torch.tensor([0.0, float(sum(int(m["num_tokens"]) for m in micro)),
                           float(sum(int(m["num_labels"]) for m in micro)), stop])
    # pinned + non_blocking: a plain host->device copy from pageable memory would wait for the GPU queue
    sums = (counts.pin_memory() if d.device.type == "cuda" else counts).to(d.device, non_blocking=True)
    for i, m in enumerate(micro):
        if d.world > 1:  # reduce-scatter gradients on the last micro-batch only
            run.model.set_requires_gradient_sync(i == len(micro) - 1)
        ls = loss_sum(run, m)
        (ls * d.world).backward()
        sums[0] += ls.detach().float()
    labels = all_reduce(sums, d)[2]
    params = [p for _, p in run.named]
    grads = [p.grad.to_local() if ck._is_dtensor(p.grad) else p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, 1.0 / labels.clamp(min=1.0))
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if ck._is_dtensor(norm) else norm
    lr = run.sched(run.st.step)
    ok = torch.isfinite(sums[0]) & torch.isfinite(norm) & (labels > 0)
    for g in run.optim.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)
    if run.optim.defaults.get("fused"):
        run.optim.found_inf = (~ok).float()  # the fused kernel leaves weights and moments alone when it is 1
        run.optim.step()
    elif bool(ok):
        run.optim.step()
    run.optim.zero_grad(set_to_none=True)
    return {"sums": sums, "norm": norm, "ok": ok, "lr": lr}


# ============================================================================= evaluation

@torch.no_grad()
def evaluate(run: Run) -> dict | None:
    """Validation loss (mean over completion tokens of --eval_max_batches batches) and, with --eval_accuracy_samples
    N, greedy accuracy on N validation problems (evalmath). None: a signal (agreed by all ranks) stopped it."""
    d, cfg, out = run.d, run.cfg, {}
    stopped = (lambda: run.stop.agreed(d.device)) if run.stop else (lambda: False)
    n = min(cfg.eval_max_batches, run.data.valid.steps_in_epoch(0)) if run.data.valid is not None else 0
    if n or cfg.eval_accuracy_samples:
        run.log(f"evaluating at step {run.st.step}: {n} validation batches"
                + (f", greedy accuracy on {cfg.eval_accuracy_samples} problems" if cfg.eval_accuracy_samples else ""))
    run.model.eval()
    try:
        if run.data.valid is not None:
            tot = torch.zeros(2, device=d.device)  # loss sum, completion tokens
            for s in range(n):
                if stopped():
                    return None
                batch = run.data.valid.batch(0, s)
                tot[0] += loss_sum(run, batch).float()
                tot[1] += int(batch["num_labels"])
            if all_reduce(tot, d)[1] > 0:
                out["eval_loss"] = float(tot[0] / tot[1])
        if cfg.eval_accuracy_samples > 0:
            import evalmath  # lazy: evalmath never imports sft

            out.update(evalmath.accuracy_during_training(
                run.model, run.data.cache_root / "records" / "valid.jsonl", cfg.eval_accuracy_samples,
                cfg.model_name_or_path, cfg.template, cfg.eval_max_new_tokens, autocast(run), stopped))
    finally:
        run.model.train()
    return None if stopped() else out


def evaluate_and_track(run: Run) -> str:
    """Evaluate and log; a new best --metric_for_best is saved as checkpoint-best. Returns why the run stops
    here: "signal" (evaluation interrupted, nothing logged), "early stop" (patience used up) or ""."""
    t0 = time.time()
    res = evaluate(run)
    if not res:  # None: a signal stopped it; {}: nothing to evaluate
        return "signal" if res is None else ""
    run.last_eval = {"step": run.st.step, **res}
    run.log.metrics(run.last_eval)
    run.log(f"eval step {run.st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()) + f" ({time.time() - t0:.1f}s)")
    return "early stop" if ck.track_best(run, res) else ""


# ============================================================================= the loop

@dataclass
class Run:
    cfg: Config
    d: Dist
    job_dir: Path
    log: RunLog
    model: Any
    lcfg: Any  # lora.LoraConfig, None for full fine-tuning
    hf_config: dict
    dtype: torch.dtype  # compute dtype
    named: list  # trainable (name, parameter)
    optim: torch.optim.Optimizer
    data: Data
    sched: Schedule
    st: ck.TrainState = field(default_factory=ck.TrainState)
    saved: set = field(default_factory=set)  # steps saved by this process
    last_eval: dict = field(default_factory=dict)
    stop: StopFlag | None = None  # set while train() runs


def train(run: Run) -> None:
    """Step, log, evaluate, save, stop; until the last step, a signal or early stopping (the step is saved first).
    Step results are read at logging, evaluation and save steps (every step on CPU): a signal or non-finite steps
    are acted upon at the next of those; a signal during an evaluation stops it before its next batch."""
    cfg, d, data = run.cfg, run.d, run.data
    run.stop = StopFlag(say=d.main)
    stream = (b for _ in iter(int, 1) for b in data.train.iter_on(d.device))  # epoch after epoch, next in flight
    recent = collections.deque(maxlen=20)  # seconds per step of the last steps, for the ETA
    pending, t_read = [], time.time()  # train_step results not read yet; when the last read ended
    run.model.train()
    try:
        while run.st.step < data.total_steps:
            st = run.st
            st.step += 1
            pending.append((st.step, train_step(run, [next(stream) for _ in range(cfg.gradient_accumulation_steps)])))
            log_now = st.step % cfg.logging_steps == 0 or st.step == data.total_steps
            eval_now = cfg.eval_steps > 0 and (st.step % cfg.eval_steps == 0 or st.step == data.total_steps)
            if not (log_now or eval_now or ck.due(run) or d.device.type != "cuda"):
                continue
            steps, pending = [(n, read_step(r)) for n, r in pending], []
            dt = time.time() - t_read
            recent.extend([dt / len(steps)] * len(steps))
            for n, res in steps:  # tokens seen; skipped steps logged, --max_bad_steps in a row: an error
                st.account(n, res, run.log, cfg.max_bad_steps, run.job_dir)
            stop = "signal" if any(r["stop"] for _, r in steps) else ""
            if log_now:  # progress line + metrics.jsonl record of the last step; throughput over the read steps
                log_step(run.log, st.step, data, steps, dt, sum(recent) / len(recent))
            stop = stop or (evaluate_and_track(run) if eval_now else "")  # a signal or patience
            if stop or ck.due(run):
                ck.save(run, stop or "interval")
            t_read = time.time()
            if stop:
                run.log(("stopping on a signal" if stop == "signal" else "early stopping") + f" at step {st.step}")
                return
    finally:
        run.stop.restore()
        run.stop = None


# ============================================================================= main

def setup(cfg: Config, d: Dist, notes: list[str]) -> Run:
    """Check everything (flags, model, weights, data) before the run folder is written: lock it, refuse to clobber
    a previous run, build model, optimizer, data and schedule, then write config.json and start the log."""
    cfg = dataclasses.replace(cfg, job_name=cfg.job_name or ck.default_job_name(cfg))
    job_dir = Path(cfg.output_dir) / cfg.job_name
    notes = notes + check_config(cfg)
    dtype = M.pick_dtype(cfg.precision, d.device.type)
    try:  # no or unreadable config.json, unsupported architecture, LoRA targets, missing/truncated/mismatched weights
        hf_config = M.read_json(ck.model_folder(cfg.model_name_or_path) / "config.json")
        notes += ck.on_rank0(d.main, lambda: ck.lock_run_folder(job_dir, bool(cfg.resume_from_checkpoint),
                                                                cfg.overwrite_output_dir))
        model, lcfg = build_model(cfg, d, hf_config, dtype)
        load_weights(model, cfg, d)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise UserError(f"error: --model_name_or_path {cfg.model_name_or_path}: {e}") from None
    named = lora.trainable_parameters(model)
    optim = build_optimizer(cfg, named, d)
    data = build_data(cfg, d)
    log = ck.start_run_folder(cfg, job_dir, d.main, d.world, notes)  # everything checked: now it is written
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * data.total_steps)
    sched = Schedule(cfg.learning_rate, data.total_steps, warmup, cfg.lr_scheduler_type, cfg.min_lr_ratio)
    log_setup(log, cfg, d.world, d.device, model, dtype, data, warmup)
    return Run(cfg, d, job_dir, log, model, lcfg, hf_config, dtype, named, optim, data, sched)


def main(argv: list[str] | None = None) -> None:
    cfg, notes = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    torch.use_deterministic_algorithms(cfg.deterministic)
    if cfg.dry_run:
        import dryrun

        return dryrun.dry_run(cfg, cfg.dry_run_world_size or int(os.environ.get("WORLD_SIZE", "1")))
    d = init_distributed()
    ck.seed_everything(cfg.seed)
    job_dir = Path(cfg.output_dir) / (cfg.job_name or ck.default_job_name(cfg))
    try:
        run = setup(cfg, d, notes)
        if run.cfg.resume_from_checkpoint:
            ck.resume(run, run.cfg.resume_from_checkpoint)
        if run.st.step >= run.data.total_steps:
            run.log(f"nothing to do: step {run.st.step} >= {run.data.total_steps} total steps")
        else:
            train(run)
        if run.st.step >= run.data.total_steps and run.st.step not in run.saved:
            ck.save(run, "final")
        run.log(f"done at step {run.st.step}; {run.st.skipped_steps} skipped steps; run folder {run.job_dir}")
        run.log.close()
    finally:
        if d.main:
            ck.release_lock(job_dir)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
