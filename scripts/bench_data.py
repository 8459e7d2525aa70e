"""Data-preparation benchmark: cold and warm prepare of GSM8K+MATH train with the real tokenizer,
tokenizer processes 1 vs N side by side, packing efficiency and loader speed.

    python scripts/bench_data.py --data_dir ../shared/data --tokenizer ../shared/models/qwen2.5-0.5b

Targets (issue): cold <= 30 s on a 2-core machine, warm <= 1 s, packing efficiency >= 98% at 2048.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from packing import PackedLoader  # noqa: E402


@dataclass
class Args:
    data_dir: str = "data/raw"
    tokenizer: str = "models/Qwen2.5-0.5B"
    template: str = "boxed"
    max_seq_length: int = 2048
    num_proc: int = 2  # compared side by side with 1
    batch_size: int = 8
    out: str = ""  # optional JSON output path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(a: Args) -> dict:
    res: dict = {"command": " ".join(["python", *sys.argv]), "cpus": os.cpu_count(),
                 "load_avg_1min_start": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp:
        def prep():
            return data.prepare(["gsm8k", "math"], "train", a.data_dir, a.tokenizer, a.template,
                                a.max_seq_length, out_dir=tmp)
        cpu0 = time.process_time()
        cache, res["cold_s"] = timed(prep)
        res["cold_cpu_s"] = time.process_time() - cpu0  # all threads of this process
        _, res["warm_s"] = timed(prep)
        cli = [sys.executable, str(REPO / "data.py"), "prepare", "--datasets", "gsm8k", "math", "--data_dir",
               a.data_dir, "--tokenizer", a.tokenizer, "--template", a.template, "--max_seq_length",
               str(a.max_seq_length), "--out_dir", tmp]
        _, res["warm_cli_process_s"] = timed(lambda: subprocess.run(cli, check=True, capture_output=True))
        meta = json.loads((cache / "meta.json").read_text())
        res.update(train_docs=meta["num_docs"], train_tokens=meta["num_tokens"],
                   trained_tokens=meta["num_trained_tokens"])

        recs = [json.loads(x) for x in (cache.parent / "records" / "train.jsonl").open()]
        tok = data.load_tokenizer(a.tokenizer)
        tpl = data.load_template(a.template)
        for n in (1, a.num_proc):
            _, res[f"tokenize_num_proc{n}_s"] = timed(lambda n=n: data.tokenize_records(
                recs, tpl, tok, a.max_seq_length, num_proc=n, tokenizer_path=a.tokenizer))

        for seq in (2048, 4096):
            loader = PackedLoader(cache, seq, a.batch_size)
            _, res[f"plan_{seq}_s"] = timed(lambda loader=loader: loader.rows(0))
            res[f"efficiency_{seq}"] = round(loader.efficiency, 4)
            res[f"steps_per_epoch_{seq}"] = loader.steps_in_epoch(0)
        loader = PackedLoader(cache, 2048, a.batch_size)
        _, t = timed(lambda: sum(1 for _ in loader))
        res["loader_batches_per_s_2048"] = round(loader.steps_in_epoch(0) / t, 1)
    res["load_avg_1min_end"] = round(os.getloadavg()[0], 1)
    res = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
