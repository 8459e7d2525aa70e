"""`make bench`: every benchmark against its peers, side by side, in one run; the tables are printed and
appended to docs/benchmarks.md under a heading with the date, machine, versions and the exact command.

    python scripts/bench.py [--quick] [--no-append] [--only train decode data grader]

  train   real tokens/s and peak RSS: a bare per-example loop, sft.py, transformers Trainer + padding
          collator and TRL SFTTrainer (the last two from bench/.venv-peers, made by `make bench-peers`;
          a peer that cannot be installed or run is reported as such in the table)
  decode  evalmath's KV-cached batched greedy vs transformers' batched generate
  data    cold and warm preparation of GSM8K+MATH train with the real Qwen2.5 tokenizer, packing efficiency
  grader  median/p99 per case on the labelled dev cases, adversarial inputs
Run it on an otherwise idle machine: the numbers are only comparable within one run.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def suites(quick: bool) -> dict[str, list[str]]:
    steps = "6" if quick else "12"
    return {
        "train": ["scripts/bench_train.py", "--steps", steps, "--peers"],
        "decode": ["scripts/bench_decode.py", "--shared", str(SHARED)] + (["--repeats", "1"] if quick else []),
        "data": ["scripts/bench_data.py", "--data_dir", str(SHARED / "data"),
                 "--tokenizer", str(SHARED / "models" / "qwen2.5-0.5b")],
        "grader": ["scripts/bench_grader.py"] + (["--repeats", "1"] if quick else []),
    }


def versions() -> str:
    import numpy
    import torch
    import transformers
    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},"
            f" numpy {numpy.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--only", nargs="+", choices=["train", "decode", "data", "grader"])
    a = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"error: {SHARED} not found: the benchmarks read the real data and tokenizers there")
    sections = []
    for name, cmd in suites(a.quick).items():
        if a.only and name not in a.only:
            continue
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
        out = p.stdout if p.returncode == 0 else f"FAILED (exit {p.returncode}):\n```\n{p.stderr[-2000:]}\n```"
        print(out, flush=True)
        sections.append(f"#### {name} ({time.time() - t0:.0f} s): `python {' '.join(cmd)}`\n\n{out.strip()}\n")
    head = (f"## make bench, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; {versions()}.\n"
            f"Command: `make bench` = `python scripts/bench.py{' --quick' if a.quick else ''}`.\n")
    if not a.no_append:
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as f:
            f.write("\n" + head + "\n" + "\n".join(sections))
        print("appended to docs/benchmarks.md")


if __name__ == "__main__":
    main()
