"""Synthetic multi-step arithmetic word problems in GSM8K format (the embedded default data set).

Each problem has two steps of two-digit addition/subtraction; every intermediate value stays
in [0, 99]. Rows are GSM8K-shaped: {"question", "answer"} where the answer is a short rationale ending
in a final line "#### N", so data.py reads them exactly like the official GSM8K files.

    python scripts/synthetic.py --out data/synthetic --n_train 20000 --n_valid 500 --n_test 500 --seed 0

The splits are disjoint by question text; the generator is deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Max",
         "Nia", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Zoe"]
ITEMS = ["apples", "books", "coins", "cards", "pens", "stamps", "marbles", "shells", "stickers", "cookies",
         "balloons", "rocks"]
GAIN = [("buys", "more"), ("finds", "more"), ("gets", "from a friend"), ("wins", "at a fair")]
LOSS = [("gives away", ""), ("sells", ""), ("loses", ""), ("eats", "")]


def _step(rng: random.Random, value: int, max_amount: int) -> tuple[str, int, int]:
    """One operation on `value` that keeps the result in [0, 99]: returns (op, amount, result)."""
    can_add = value + 1 <= 99
    can_sub = value >= 1
    op = rng.choice(["+", "-"] if can_add and can_sub else ["+"] if can_add else ["-"])
    if op == "+":
        amount = rng.randint(1, min(max_amount, 99 - value))
        return op, amount, value + amount
    amount = rng.randint(1, min(max_amount, value))
    return op, amount, value - amount


def make_problem(rng: random.Random, max_amount: int = 9) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(10, 99)
    n_steps = 2
    sentences = [f"{name} has {start} {item}."]
    lines = []
    value = start
    for _ in range(n_steps):
        op, amount, result = _step(rng, value, max_amount)
        verb, tail = rng.choice(GAIN if op == "+" else LOSS)
        extra = f" {tail}" if tail else ""
        sentences.append(f"Then {name} {verb} {amount}{extra}.")
        lines.append(f"{value} {op} {amount} = {result}.")
        value = result
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = " ".join(lines) + f"\n#### {value}"
    return {"question": question, "answer": answer}


def generate(out: Path, n_train: int, n_valid: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """Write train/valid/test jsonl files with disjoint questions; returns the paths."""
    rng = random.Random(seed)
    seen: set[str] = set()
    sizes = {"test": n_test, "valid": n_valid, "train": n_train}
    rows: dict[str, list[dict]] = {k: [] for k in sizes}
    for split, n in sizes.items():  # held-out splits first so train never shadows them
        attempts = 0
        while len(rows[split]) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct {split} problems; lower the count")
            p = make_problem(rng)
            if p["question"] in seen:
                continue
            seen.add(p["question"])
            rows[split].append(p)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in rows.items():
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        tmp.replace(path)
        paths[split] = path
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/synthetic/arith"))
    ap.add_argument("--n_train", type=int, default=20000)
    ap.add_argument("--n_valid", type=int, default=500)
    ap.add_argument("--n_test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for split, path in generate(a.out, a.n_train, a.n_valid, a.n_test, a.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
