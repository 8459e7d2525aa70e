"""`make demo`: the whole main job on the embedded default, end to end, with nothing downloaded.

    make demo                      # LoRA (default)        python scripts/demo.py --mode lora
    make demo MODE=full            # full fine-tuning      python scripts/demo.py --mode full
    make demo DATA_DIR=../shared/data DATASETS=gsm8k    # the same flow on real GSM8K (a subset)

Steps (each one is the real CLI a user would run; the commands are printed and written to the report):
  1. model.py make-tiny     a random-init Llama with a byte-level BPE tokenizer trained on the task's text
  2. scripts/synthetic.py   seeded multi-step arithmetic word problems in GSM8K format (train/valid/test)
  3. evalmath.py            accuracy of the untrained model on the held-out test problems
  4. sft.py                 fine-tuning with checkpoints, validation loss and accuracy, best-by-accuracy
  5. evalmath.py            accuracy of checkpoint-best on the same test problems
  6. docs/reports/demo-<mode>.md: accuracy before/after, the loss curve, and where every file went
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# The embedded default: sized so that LoRA reaches >= 90% on held-out problems within 5 minutes of
# training on a 2-core CPU (measured numbers are in docs/benchmarks.md and the demo report).
SYNTH = {"n_train": 20000, "n_valid": 500, "n_test": 500, "seed": 0}
MODEL = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 4, "seed": 0}
TRAIN = {
    "lora": ["--use_lora", "true", "--lora_r", "64", "--lora_alpha", "64", "--lora_dropout", "0.0",
             "--learning_rate", "3e-3"],
    "full": ["--use_lora", "false", "--learning_rate", "1e-3"],
}
COMMON_TRAIN = ["--max_seq_length", "512", "--per_device_train_batch_size", "8", "--max_steps", "600",
                "--warmup_steps", "30", "--lr_scheduler_type", "cosine", "--save_strategy", "steps",
                "--save_steps", "200", "--eval_steps", "200", "--eval_accuracy_samples", "100",
                "--eval_max_new_tokens", "80", "--metric_for_best", "accuracy", "--logging_steps", "20"]


def run(cmd: list[str], log: list[str]) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"[{time.time() - t0:.0f} s]", flush=True)


def loss_curve(metrics: Path, width: int = 60) -> tuple[list[tuple[int, float]], str]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and r.get("kind", "train") == "train"]
    if not pts:
        return [], "(no training loss logged)"
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    step = max(1, len(pts) // width)
    spark = "".join(bars[min(7, int((v - lo) / (hi - lo + 1e-12) * 7.999))] for _, v in pts[::step])
    return pts, f"{spark}  (loss {pts[0][1]:.3f} at step {pts[0][0]} → {pts[-1][1]:.3f} at step {pts[-1][0]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--data_dir", default="", help="real data folder (e.g. ../shared/data); default: synthetic")
    ap.add_argument("--datasets", nargs="+", default=["gsm8k"])
    ap.add_argument("--max_steps", type=int, default=0, help="override the training steps (0: the default)")
    ap.add_argument("--test_limit", type=int, default=500)
    ap.add_argument("--work", default="outputs/demo", help="where the model and run folders go")
    a = ap.parse_args()

    py, work, log = sys.executable, REPO / a.work, []
    job = f"demo-{a.mode}" + ("-" + "-".join(a.datasets) if a.data_dir else "")
    model_dir = work / "model"
    t_start = time.time()

    # 1-2. data and model
    if a.data_dir:
        train_src, test_args = ["--datasets", *a.datasets, "--data_dir", a.data_dir], \
            ["--datasets", *a.datasets, "--data_dir", a.data_dir]
        corpus = [str(Path(a.data_dir) / a.datasets[0] / "train.jsonl")]
    else:
        from synthetic import generate
        synth_dir = REPO / "data" / "synthetic" / "arith"
        paths = generate(synth_dir, **SYNTH)
        log.append(f"{py} scripts/synthetic.py --out {synth_dir.relative_to(REPO)} " +
                   " ".join(f"--{k} {v}" for k, v in SYNTH.items()))
        train_src = ["--train_files", str(paths["train"].relative_to(REPO))]
        test_args = ["--dataset_file", str(paths["test"].relative_to(REPO))]
        corpus = [str(paths["train"].relative_to(REPO))]
    run([py, "model.py", "make-tiny", "--out", str(model_dir.relative_to(REPO)), "--arch", "llama",
         "--tokenizer_corpus", *corpus] + [x for k, v in MODEL.items() for x in (f"--{k}", str(v))], log)

    # 3. before
    eval_common = ["--template", "plain", "--limit", str(a.test_limit), "--max_new_tokens", "96",
                   "--batch_size", "32", "--output_dir", str((work / "eval").relative_to(REPO)),
                   "--reports_dir", str((work / "reports").relative_to(REPO))]
    run([py, "evalmath.py", "--model", str(model_dir.relative_to(REPO)), *test_args, *eval_common,
         "--run_name", f"{job}-before"], log)
    before = newest_result_any(work / "eval")

    # 4. train
    steps = ["--max_steps", str(a.max_steps)] if a.max_steps else []
    out_dir = work / "checkpoints"
    run([py, "sft.py", "--model_name_or_path", str(model_dir.relative_to(REPO)), *train_src,
         "--template", "plain", "--output_dir", str(out_dir.relative_to(REPO)), "--job_name", job,
         "--overwrite_output_dir", "true", *COMMON_TRAIN, *TRAIN[a.mode], *steps], log)
    job_dir = out_dir / job
    best = job_dir / "checkpoint-best"

    # 5. after
    run([py, "evalmath.py", "--model", str(best.relative_to(REPO)), *test_args, *eval_common,
         "--run_name", f"{job}-after"], log)
    after = newest_result_any(work / "eval")

    write_report(a, job, job_dir, model_dir, before, after, log, time.time() - t_start)


def newest_result_any(folder: Path) -> dict:
    files = sorted(folder.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no evaluation result under {folder}")
    return json.loads(files[-1].read_text()) | {"_path": str(files[-1].relative_to(REPO))}


def write_report(a, job, job_dir: Path, model_dir: Path, before: dict, after: dict, log: list[str],
                 seconds: float) -> None:
    pts, curve = loss_curve(job_dir / "metrics.jsonl")
    acc_b, acc_a = before["summary"]["accuracy"], after["summary"]["accuracy"]
    se_a = after["summary"].get("stderr", 0.0)
    rel = lambda p: str(Path(p).relative_to(REPO)) if Path(p).is_absolute() else str(p)
    lines = [
        f"# Demo report: {job}", "",
        f"Mode: **{a.mode}**. Data: {'synthetic multi-step arithmetic (GSM8K format)' if not a.data_dir else a.data_dir}.",
        f"Total wall time: {seconds / 60:.1f} min.", "",
        "| | accuracy | n |", "| --- | --- | --- |",
        f"| untrained model | {acc_b:.1%} | {before['summary'].get('n')} |",
        f"| fine-tuned (checkpoint-best) | {acc_a:.1%} ± {se_a:.1%} | {after['summary'].get('n')} |", "",
        "## Training loss", "", "```", curve, "```", "",
        "## Where every file went", "",
        f"- model (random init, HF format): `{rel(model_dir)}/`",
        f"- run folder: `{rel(job_dir)}/` (config.json, train.log, metrics.jsonl, checkpoint-*/, checkpoint-best/)",
        f"- evaluation before: `{before['_path']}`",
        f"- evaluation after: `{after['_path']}`",
        f"- this report: `docs/reports/{job}.md`", "",
        "## Commands", "", "```", *log, "```", "",
    ]
    out = REPO / "docs" / "reports" / f"{job}.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[:12]))
    print(f"\nreport: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
