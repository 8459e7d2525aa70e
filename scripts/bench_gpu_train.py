"""GPU training throughput: sft.py against the transformers `Trainer` on the same tokenized GSM8K examples.

    python scripts/bench_gpu_train.py --stage_assets      # where ../shared exists: copies what the GPU run needs
                                                          # into gpu_assets/ (git-ignored; carry it to the GPU box)
    python scripts/bench_gpu_train.py [--big] [--out docs/benchmarks.md] [--json rows.json]
    python scripts/bench_gpu_train.py --smoke             # CPU, tiny shapes, a minute: checks the plumbing only

Rows (`training_rows(args) -> list[dict]`, imported by scripts/bench_gpu.py):
  ours      `python sft.py ...` as a subprocess (the real CLI): packed rows of --seq tokens, --rows per step,
            bf16 (`--precision auto`), LoRA r16/alpha32 on all seven projections or full fine-tuning, once per
            --attn_impls entry (varlen and flex on CUDA: the comparison behind model.py's "auto").
  trainer   transformers `Trainer` (+ peft LoRA with the same targets for lora), bf16, attn_implementation sdpa,
            DataCollatorForSeq2Seq padding: (a) the largest per-device batch of --trainer_batches that fits,
            (b) that batch with gradient accumulation up to the real tokens per step of ours.
  --big     adds ours, LoRA r16, at the Llama-3-8B shape (32 layers, 4096 wide, GQA 32/8, 14336 MLP, vocab
            128256, random init written in bf16; token ids from the llama-2-7b tokenizer), rows of 4096.
Model shapes are random-init (make_tiny): losses are meaningless, speed and memory are real.

Measured: real (non-pad) tokens/s over the steps after --warmup (ours: sum of tokens / sum of step times from
sft.py's metrics.jsonl; trainer: tokens of the timed micro-batches / wall time between torch.cuda.synchronize()
calls); model TFLOP/s = tokens/s x (6N full or 4N LoRA + attention 6 x layers x heads x head_dim x E[len^2] /
E[len], the causal per-document attention matmuls forward and backward), N = all parameters, tied embeddings
once; peak memory = torch.cuda.max_memory_allocated() of the run's process (CPU: peak RSS).

Assets: the tokenizers (models/qwen2.5-0.5b, models/llama-2-7b) and data/gsm8k/train.jsonl come from ../shared ($MATHSFT_SHARED)
or gpu_assets/ (same layout). sft.py needs tyro; a GPU box without it gets gpu_assets/pylib (tyro and its pure
Python dependencies, staged by --stage_assets) on PYTHONPATH. Runs go to bench/runs/gpu/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "bench" / "runs" / "gpu"
ASSET_ROOTS = (Path(os.environ.get("MATHSFT_SHARED", REPO.parent / "shared")), REPO / "gpu_assets")
PYLIB = REPO / "gpu_assets" / "pylib"
STAGED_PACKAGES = ("tyro", "docstring_parser", "typeguard")  # sft.py's CLI and what tyro imports beyond torch's deps
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (make_tiny arguments, tokenizer folder under models/, packed row length, rows per step)
SHAPES = {
    "qwen2.5-0.5b": (dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                          vocab=151936, tie_word_embeddings=True), "qwen2.5-0.5b"),
    "llama3-8b": (dict(arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                       vocab=128256, dtype="bfloat16"), "llama-2-7b"),
    "smoke": (dict(arch="qwen2", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=151936,
                   tie_word_embeddings=True), "qwen2.5-0.5b"),
}

# Runs a script in this process and prints its peak memory: CUDA max_memory_allocated, else the peak RSS.
PEAK_WRAPPER = """import atexit, resource, runpy, sys, torch
def _peak():
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    b = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("PEAK_MEM_BYTES", b, "cuda" if cuda else "rss", flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: the plumbing, not a measurement")
    ap.add_argument("--big", action="store_true", help="also ours LoRA r16 at the Llama-3-8B shape, rows of 4096")
    ap.add_argument("--stage_assets", action="store_true", help="copy tokenizers, GSM8K and tyro into gpu_assets/")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--runners", nargs="+", default=["ours", "trainer"], choices=["ours", "trainer"])
    ap.add_argument("--attn_impls", nargs="+", default=None,
                    help="sft.py --attn_impl values to run ours with (default: varlen flex on CUDA, auto on CPU)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=6, help="steps excluded from timing (compilation, allocator)")
    ap.add_argument("--seq", type=int, default=2048, help="ours: packed row length (also the truncation length)")
    ap.add_argument("--rows", type=int, default=8, help="ours: packed rows per step")
    ap.add_argument("--trainer_steps", type=int, default=12)
    ap.add_argument("--trainer_warmup", type=int, default=4)
    ap.add_argument("--trainer_batches", type=int, nargs="+", default=[64, 32, 16],
                    help="per-device examples per micro-batch to try, largest first; the first that fits is kept")
    ap.add_argument("--big_seq", type=int, default=4096)
    ap.add_argument("--big_rows", type=int, default=1, help="--big: rows per micro-batch")
    ap.add_argument("--big_accum", type=int, default=4, help="--big: micro-batches per step (4 x 4096 tokens)")
    ap.add_argument("--big_steps", type=int, default=12)
    ap.add_argument("--big_warmup", type=int, default=4)
    ap.add_argument("--sft_args", default="", help="extra sft.py flags for every ours run, e.g. '--compile false'")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is reported as failed")
    ap.add_argument("--out", default="", help="append the markdown table to this file")
    ap.add_argument("--json", default="", help="write the rows as JSON to this file")
    return ap


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """args completed with the parser's defaults (callers may pass a partial Namespace), smoke sizes applied."""
    a = argparse.Namespace(**(vars(build_parser().parse_args([])) | vars(args)))
    if a.smoke:
        a.steps, a.warmup, a.seq, a.rows = min(a.steps, 3), 1, 256, 2
        a.trainer_steps, a.trainer_warmup, a.trainer_batches = 3, 1, [4]
        a.big = False
    if a.attn_impls is None:
        a.attn_impls = ["varlen", "flex"] if _cuda() else ["auto"]
    return a


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------- assets

def asset_root() -> Path:
    for root in ASSET_ROOTS:
        if (root / "data" / "gsm8k" / "train.jsonl").is_file() and (root / "models" / "qwen2.5-0.5b").is_dir():
            return root
    raise SystemExit(f"error: no GSM8K train data and tokenizer in {' or '.join(map(str, ASSET_ROOTS))}: expected "
                     "data/gsm8k/train.jsonl and models/qwen2.5-0.5b there; run "
                     "`python scripts/bench_gpu_train.py --stage_assets` where ../shared exists")


def stage_assets() -> Path:
    """Copies the tokenizers, GSM8K train and tyro (+ deps) from ../shared and this venv into gpu_assets/."""
    import importlib

    src, dst = ASSET_ROOTS
    if not (src / "data" / "gsm8k" / "train.jsonl").is_file():
        raise SystemExit(f"error: --stage_assets needs {src}/data/gsm8k/train.jsonl")
    for sub in ("models/qwen2.5-0.5b", "models/llama-2-7b", "data/gsm8k"):
        shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    for name in STAGED_PACKAGES:
        pkg = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(pkg, PYLIB / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def model_dir(shape: str, root: Path) -> Path:
    """The random-init model of `shape` (written once, reused)."""
    from maketiny import make_tiny

    kw, tok = SHAPES[shape]
    out = WORK / "models" / shape
    if not (out / "config.json").is_file():
        make_tiny(out, tokenizer=root / "models" / tok, seed=0, **kw)
    return out


def export_examples(mdir: Path, root: Path, seq: int) -> tuple[Path, float, float]:
    """GSM8K train (`plain` template) tokenized once by data.prepare, exported as {input_ids, labels} lines for
    the Trainer; returns (file, mean length, mean squared length)."""
    import numpy as np

    import data

    cache = data.prepare(["gsm8k"], "train", data_dir=root / "data", tokenizer_path=str(mdir), template="plain",
                         max_seq_length=seq, out_dir=WORK / "processed", valid_fraction=0.0)
    toks, masks, offs = (np.load(cache / f) for f in ("tokens.npy", "loss_mask.npy", "doc_offsets.npy"))
    out = WORK / f"examples-{mdir.name}-{seq}.jsonl"
    with open(out, "w") as f:
        for s, e in zip(offs[:-1], offs[1:]):
            ids = toks[s:e].tolist()
            # loss_mask[t] marks token t as trained; HF shifts labels itself: labels[t] = ids[t] where trained
            f.write(json.dumps({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, masks[s:e])]})
                    + "\n")
    lens = np.diff(offs).astype(np.float64)
    return out, float(lens.mean()), float((lens ** 2).mean())


# ----------------------------------------------------------------------------------------------------- flops

def param_count(cfg: dict) -> int:
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = (q + 2 * kv) if cfg["model_type"] == "qwen2" else 0
    layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
    return V * h * (1 if cfg.get("tie_word_embeddings") else 2) + L * layer + h


def flops_per_token(cfg: dict, mode: str, mean_len: float, mean_sq: float) -> float:
    """6N (full) or 4N (LoRA: forward + input gradients) + causal per-document attention, forward + backward."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    attn = 6 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * hd * mean_sq / mean_len
    return (6 if mode == "full" else 4) * param_count(cfg) + attn


# ----------------------------------------------------------------------------------------------------- runners

def _env() -> dict:
    path = [str(REPO)] + ([str(PYLIB)] if PYLIB.is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], timeout: int) -> tuple[str, float, str]:
    """Runs a script under PEAK_WRAPPER; returns (stdout, peak GiB, 'cuda'|'rss'). Raises with the tail on failure."""
    try:
        p = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout} s") from None
    peak = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("PEAK_MEM_BYTES")]
    if p.returncode != 0:
        tail = (p.stdout[-1500:] + "\n" + p.stderr[-2500:]).strip()
        raise RuntimeError(("out of memory: " if "OutOfMemoryError" in tail else "") + tail)
    return p.stdout, int(peak[-1][1]) / 2**30 if peak else float("nan"), peak[-1][2] if peak else "?"


def run_ours(mdir: Path, root: Path, mode: str, impl: str, seq: int, rows: int, accum: int, steps: int,
             warmup: int, a) -> dict:
    job = f"{mdir.name}-{mode}-{impl}-{seq}x{rows}x{accum}"
    cmd = ["sft.py", "--model_name_or_path", str(mdir), "--datasets", "gsm8k", "--data_dir", str(root / "data"),
           "--template", "plain", "--max_seq_length", str(seq), "--per_device_train_batch_size", str(rows),
           "--gradient_accumulation_steps", str(accum), "--max_steps", str(steps), "--logging_steps", "1",
           "--save_strategy", "no", "--valid_fraction", "0", "--learning_rate", "1e-4",
           "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--warmup_ratio", "0",
           "--use_lora", "true" if mode == "lora" else "false", "--lora_r", "16", "--lora_alpha", "32",
           "--lora_dropout", "0", "--attn_impl", impl, "--output_dir", str(WORK / "jobs"), "--job_name", job,
           "--overwrite_output_dir", "true", "--data_cache_dir", str(WORK / "processed"), *a.sft_args.split()]
    _, peak, kind = _run(cmd, a.timeout)
    metrics = [json.loads(x) for x in (WORK / "jobs" / job / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in metrics if "tokens_per_s" in r and r.get("step", 0) > warmup]
    if not timed:
        raise RuntimeError(f"no timed steps in {WORK / 'jobs' / job / 'metrics.jsonl'} (steps {steps}, warmup {warmup})")
    tokens = sum(r["tokens"] for r in timed)
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": tokens / secs, "real_tokens_per_step": tokens / len(timed), "peak_mem_gib": peak,
            "peak_kind": kind, "loss": timed[-1]["loss"], "micro_batch": f"{rows} x {seq} packed",
            "grad_accum": accum, "timed_steps": len(timed)}


def run_trainer(mdir: Path, examples: Path, mode: str, batch: int, accum: int, steps: int, warmup: int, a) -> dict:
    spec = dict(model=str(mdir), examples=str(examples), mode=mode, batch=batch, accum=accum, steps=steps,
                warmup=warmup, out=str(WORK / "trainer-tmp"))
    try:
        out, peak, kind = _run([str(Path(__file__).resolve()), "--_trainer_worker", json.dumps(spec)], a.timeout)
    except RuntimeError as e:
        raise RuntimeError(f"{batch} examples x {accum}: {str(e).strip().splitlines()[-1]}") from None
    r = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    return r | {"peak_mem_gib": peak, "peak_kind": kind, "micro_batch": f"{batch} examples, padded",
                "grad_accum": accum}


def trainer_worker(spec: dict) -> None:
    """One Trainer run (its own process, so its peak memory is its own); prints one JSON line."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    n = spec["steps"] * spec["batch"] * spec["accum"]
    rows = [json.loads(x) for x in open(spec["examples"])]
    rows = (rows * -(-n // len(rows)))[:n]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if spec["mode"] == "lora" and cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    if spec["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock: dict = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == spec["warmup"] and "t0" not in clock:
                sync()
                clock["t0"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock["loss"] = logs["loss"]

    collated: list[int] = []  # real tokens of each micro-batch, in the order the Trainer drew them
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = pad(features)
        collated.append(int(batch["attention_mask"].sum()))
        return batch

    targs = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=spec["batch"],
                              gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"],
                              learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                              save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda, seed=0,
                              dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        print(json.dumps({"error": "out of memory"}), flush=True)
        raise
    sync()
    secs = time.perf_counter() - clock["t0"]
    first, last = spec["warmup"] * spec["accum"], spec["steps"] * spec["accum"]
    real = sum(collated[first:last])
    print(json.dumps({"tokens_per_s": real / secs, "real_tokens_per_step": real / (spec["steps"] - spec["warmup"]),
                      "loss": clock.get("loss", float("nan")), "timed_steps": spec["steps"] - spec["warmup"]}))


# ----------------------------------------------------------------------------------------------------- rows

def training_rows(args: argparse.Namespace) -> list[dict]:
    """Every row of the comparison (see the module docstring); a run that fails is a row with `error`."""
    a = with_defaults(args)
    root = asset_root()
    WORK.mkdir(parents=True, exist_ok=True)
    shape = "smoke" if a.smoke else "qwen2.5-0.5b"
    mdir = model_dir(shape, root)
    cfg = json.loads((mdir / "config.json").read_text())
    examples, mean_len, mean_sq = export_examples(mdir, root, a.seq)
    out: list[dict] = []

    def add(runner, mode, impl, fn, *fargs, shape_name=shape, cfg_=cfg, stats=(mean_len, mean_sq)):
        row = {"runner": runner, "mode": mode, "shape": shape_name, "attn_impl": impl}
        t0 = time.perf_counter()
        try:
            row |= fn(*fargs)
            row["model_tflops"] = row["tokens_per_s"] * flops_per_token(cfg_, mode, *stats) / 1e12
        except Exception as e:  # reported in the table, the other rows still run
            row["error"] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        out.append(row)
        return row

    for mode in a.modes:
        ours_tokens = []
        if "ours" in a.runners:
            for impl in a.attn_impls:
                r = add("ours", mode, impl, run_ours, mdir, root, mode, impl, a.seq, a.rows, 1, a.steps, a.warmup, a)
                if "error" not in r:
                    ours_tokens.append(r["real_tokens_per_step"])
        if "trainer" in a.runners:
            fit = None
            for b in a.trainer_batches:  # largest first: the first that fits is the Trainer's best micro-batch
                r = add("trainer", mode, "sdpa", run_trainer, mdir, examples, mode, b, 1, a.trainer_steps,
                        a.trainer_warmup, a)
                if "error" not in r:
                    fit = b
                    break
            if fit and ours_tokens:  # the same real tokens per step as ours, by gradient accumulation
                want = max(1, round(max(ours_tokens) / mean_len))  # examples per step
                accum = -(-want // fit)
                b = -(-want // accum)
                add("trainer", mode, "sdpa", run_trainer, mdir, examples, mode, b, accum, a.trainer_steps,
                    a.trainer_warmup, a)
    if a.big:
        big = model_dir("llama3-8b", root)
        bcfg = json.loads((big / "config.json").read_text())
        _, blen, bsq = export_examples(big, root, a.big_seq)
        impl = a.attn_impls[0]
        add("ours", "lora", impl, run_ours, big, root, "lora", impl, a.big_seq, a.big_rows, a.big_accum,
            a.big_steps, a.big_warmup, a, shape_name="llama3-8b", cfg_=bcfg, stats=(blen, bsq))
    return out


def render(rows: list[dict], a: argparse.Namespace) -> str:
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    cmd = "python scripts/bench_gpu_train.py " + " ".join(sys.argv[1:])
    lines = [f"### GPU training throughput ({time.strftime('%Y-%m-%d')}, {dev}, torch {torch.__version__})", "",
             f"`{cmd.strip()}`: GSM8K train, `plain` template, random-init models; ours {a.steps} steps "
             f"(first {a.warmup} untimed), Trainer {a.trainer_steps} steps (first {a.trainer_warmup} untimed).", "",
             "| runner | mode | shape | attention | micro-batch | accum | real tokens/step | real tokens/s | "
             "model TFLOP/s | peak GiB | loss / error |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        head = f"| {r['runner']} | {r['mode']} | {r['shape']} | {r['attn_impl']} |"
        if "error" in r:
            lines.append(f"{head} | | | | | | | {r['error'][:120]} |")
            continue
        peak = f"{r['peak_mem_gib']:.1f}" + ("" if r.get("peak_kind") == "cuda" else " (RSS)")
        lines.append(f"{head} {r['micro_batch']} | {r['grad_accum']} | {r['real_tokens_per_step']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} | {peak} | {r['loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_trainer_worker"]:
        return trainer_worker(json.loads(argv[1]))
    a = with_defaults(build_parser().parse_args(argv))
    if a.stage_assets:
        print(f"staged into {stage_assets()}")
        return
    rows = training_rows(a)
    table = render(rows, a)
    print(table)
    if a.out:
        with open(REPO / a.out, "a") as f:
            f.write("\n" + table + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not rows or all("error" in r for r in rows):
        raise SystemExit("error: every run failed (see the table)")


if __name__ == "__main__":
    main()
