"""The reference loop for scripts/bench_train.py: our model, one example per forward (per-example
attention, no padding), loss summed over the batch's completion tokens, AdamW. Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import IGNORE_INDEX  # noqa: E402
from lora import LoraConfig, inject_lora  # noqa: E402
from model import Transformer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, t in (("model", str), ("examples", str), ("mode", str), ("steps", int), ("batch", int),
                 ("warmup", int), ("threads", int), ("seq", int)):
        ap.add_argument(f"--{k}", type=t, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = [json.loads(x) for x in open(a.examples)]
    model = Transformer.from_pretrained(a.model)
    if a.mode == "lora":
        inject_lora(model, LoraConfig(r=16, alpha=32))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    real, secs, loss = 0, 0.0, float("nan")
    for step in range(a.steps):
        batch = rows[step * a.batch:(step + 1) * a.batch]
        t0 = time.perf_counter()
        n_lab = sum(sum(x != IGNORE_INDEX for x in r["labels"][1:]) for r in batch)
        total = 0.0
        for r in batch:
            ids = torch.tensor([r["input_ids"][:a.seq]])
            lab = torch.tensor([r["labels"][:a.seq]])
            logits = model(ids)
            ls = F.cross_entropy(logits[0, :-1].float(), lab[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
            (ls / n_lab).backward()
            total += ls.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = total / n_lab
        if step >= a.warmup:
            secs += time.perf_counter() - t0
            real += sum(min(len(r["input_ids"]), a.seq) for r in batch)
    print(json.dumps({"tok_s": real / secs, "loss": loss}))


if __name__ == "__main__":
    main()
