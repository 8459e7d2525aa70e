"""Training throughput side by side, in one run: real (non-pad) tokens per second and peak RSS.

    python scripts/bench_train.py [--steps 12] [--threads 1] [--peers]     # --peers: needs bench/.venv-peers

Runners, each in its own process on the same model folder and the same token ids (GSM8K train, `plain`
template, our tokenized cache exported once):
  bare    a bare torch loop over our model: one example per forward (per-example attention, no padding)
  ours    `python sft.py` (packed rows, document-masked attention, global-token loss), the real CLI
  hf      transformers `Trainer` + `DataCollatorForSeq2Seq` padding (peer venv, never a project dependency)
  trl     TRL `SFTTrainer` on the same pre-tokenized examples (peer venv)
For each: LoRA and full. Real tokens are the non-pad input tokens the runner consumed; time excludes
start-up and the first (warm-up) steps. The peer venv is made by `make bench-peers` (bench/.venv-peers with
transformers, peft, trl, accelerate, datasets and torch==2.13.0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "bench" / "runs"
PEERS_PY = REPO / "bench" / ".venv-peers" / "bin" / "python"

# Runs a command and prints the peak RSS of that command's process tree (children), in MiB.
RSS_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True); "
               "sys.exit(r.returncode)")


def sh(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run under the RSS wrapper; return (stdout, peak RSS MiB)."""
    p = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss = float(p.stdout.rsplit("PEAK_RSS_MIB", 1)[1].split()[0])
    return p.stdout, rss


def last_json(out: str) -> dict:
    return json.loads([x for x in out.splitlines() if x.startswith("{")][-1])


def setup(n_examples: int, seq: int, hidden: int, layers: int, shape: str = "tiny") -> tuple[Path, Path]:
    """The model (a ~5M-parameter Llama with a BPE trained on GSM8K text, or a random-init model of the real
    Qwen2.5-0.5B shape with its tokenizer) and the exported token ids."""
    import numpy as np

    import data
    from maketiny import make_tiny

    shared = REPO.parent / "shared" / "data"
    model_dir = WORK / (f"llama-h{hidden}-l{layers}" if shape == "tiny" else "qwen2.5-0.5b-shape")
    if shape == "qwen0.5b" and not (model_dir / "config.json").exists():  # the real config's sizes
        make_tiny(model_dir, arch="qwen2", seed=0, tokenizer=REPO.parent / "shared" / "models" / "qwen2.5-0.5b",
                  hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
    if not (model_dir / "config.json").exists():
        make_tiny(model_dir, arch="llama", seed=0, hidden=hidden, layers=layers, heads=4, kv_heads=4,
                  tokenizer_corpus=[str(shared / "gsm8k" / "train.jsonl")])
    cache = data.prepare(data.DataConfig(datasets=("gsm8k",), data_dir=str(shared), tokenizer=str(model_dir),
                                         template="plain", max_seq_length=seq, out_dir=str(WORK / "processed"),
                                         valid_fraction=0.0))
    toks, masks = np.load(cache / "tokens.npy"), np.load(cache / "loss_mask.npy")
    offs = np.load(cache / "doc_offsets.npy")
    exported = WORK / f"examples-{seq}.jsonl"
    with open(exported, "w") as f:
        for i in range(min(n_examples, len(offs) - 1)):
            ids = toks[offs[i]:offs[i + 1]].tolist()
            m = masks[offs[i]:offs[i + 1]]
            f.write(json.dumps({"input_ids": ids, "labels": [t if k else -100 for t, k in zip(ids, m)]}) + "\n")
    return model_dir, exported


def run_ours(model_dir: Path, exported: Path, mode: str, a) -> dict:
    job = f"bench-{mode}"
    cmd = ["sft.py", "--model_name_or_path", str(model_dir), "--train_files", str(exported.with_suffix(".src.jsonl")),
           "--template", "plain", "--max_seq_length", str(a.seq), "--per_device_train_batch_size", str(a.batch),
           "--max_steps", str(a.steps), "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(WORK / "jobs"),
           "--job_name", job, "--overwrite_output_dir", "true", "--num_threads", str(a.threads),
           "--valid_fraction", "0", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
           "--warmup_ratio", "0", "--use_lora", "true" if mode == "lora" else "false",
           "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--data_cache_dir", str(WORK / "processed")]
    out, rss = sh([sys.executable, *cmd], env={"OMP_NUM_THREADS": str(a.threads)})
    rows = [json.loads(x) for x in (WORK / "jobs" / job / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][a.warmup:]
    real = sum(r["tokens"] for r in rows)  # sft.py logs real (non-pad) tokens per step
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    return {"tok_s": real / secs, "rss": rss, "loss": rows[-1]["loss"]}


def run_script(python: Path, script: str, model_dir: Path, exported: Path, mode: str, a) -> dict:
    cmd = [str(python), str(REPO / "scripts" / script), "--model", str(model_dir), "--examples", str(exported),
           "--mode", mode, "--steps", str(a.steps), "--batch", str(a.peer_batch or a.batch), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--seq", str(a.seq)]
    out, rss = sh(cmd, env={"OMP_NUM_THREADS": str(a.threads)})
    return last_json(out) | {"rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--peer_batch", type=int, default=0,
                    help="examples per step for bare/hf/trl (default --batch); sft.py's --batch counts packed rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", choices=["tiny", "qwen0.5b"], default="tiny",
                    help="qwen0.5b: random-init model of the real Qwen2.5-0.5B shape (494M parameters)")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--peers", action="store_true", help="also run transformers Trainer and TRL (peer venv)")
    ap.add_argument("--runners", nargs="+", default=["bare", "ours", "hf", "trl"],
                    help="subset of runners (hf/trl also need --peers)")
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir, exported = setup(a.examples, a.seq, a.hidden, a.layers, a.shape)
    # sft.py reads raw jsonl: hand it the same GSM8K rows the export came from
    src = exported.with_suffix(".src.jsonl")
    rows = (REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:a.examples]
    src.write_text("\n".join(rows) + "\n")

    results: dict[tuple[str, str], dict] = {}
    for mode in a.modes:
        if "bare" in a.runners:
            results[("bare", mode)] = run_bare(model_dir, exported, mode, a)
        if "ours" in a.runners:
            results[("ours", mode)] = run_ours(model_dir, exported, mode, a)
        if a.peers:
            for peer in [r for r in ("hf", "trl") if r in a.runners]:
                try:
                    results[(peer, mode)] = run_peer(peer, model_dir, exported, mode, a)
                except Exception as e:  # a peer that cannot run is reported, not fatal
                    results[(peer, mode)] = {"error": str(e).splitlines()[0][:120]}
    table = render(results, a)
    print(table)
    if a.out:
        with open(REPO / a.out, "a") as f:
            f.write("\n" + table + "\n")


def run_bare(model_dir: Path, exported: Path, mode: str, a) -> dict:
    return run_script(Path(sys.executable), "bench_train_bare.py", model_dir, exported, mode, a)


def run_peer(peer: str, model_dir: Path, exported: Path, mode: str, a) -> dict:
    if not PEERS_PY.exists():
        raise RuntimeError("bench/.venv-peers missing: run `make bench-peers`")
    return run_script(PEERS_PY, "bench_train_peer.py", model_dir, exported, mode, a) if peer == "hf" else \
        run_script(PEERS_PY, "bench_train_peer.py", model_dir, exported, mode + ":trl", a)


def render(results: dict, a) -> str:
    import torch
    lines = [f"### Training throughput ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
             f"{a.threads} thread(s), torch {torch.__version__})", "",
             f"`python scripts/bench_train.py --steps {a.steps} --batch {a.batch} --seq {a.seq} --threads {a.threads}"
             + (f" --peer_batch {a.peer_batch}" if a.peer_batch else "") +
             f"{' --peers' if a.peers else ''} --shape {a.shape} --modes {' '.join(a.modes)} --runners {' '.join(a.runners)}`: "
             + (f"~{a.hidden}-wide {a.layers}-layer Llama" if a.shape == "tiny" else "Qwen2.5-0.5B shape, random init")
             + f", GSM8K train, `plain` template, "
             f"batch {a.batch} x {a.seq}" + (f" (bare/hf/trl: {a.peer_batch} examples per step)" if a.peer_batch else "")
             + f"; first {a.warmup} steps excluded.", "",
             "| runner | mode | real tokens/s | vs bare loop | peak RSS MiB | last loss |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for (runner, mode), r in results.items():
        if "error" in r:
            lines.append(f"| {runner} | {mode} | n/a | | | {r['error']} |")
            continue
        base = results.get(("bare", mode), {}).get("tok_s")
        ratio = f"{r['tok_s'] / base:.0%}" if base else ""
        lines.append(f"| {runner} | {mode} | {r['tok_s']:,.0f} | {ratio} | {r['rss']:,.0f} | {r['loss']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
