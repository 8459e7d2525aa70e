"""Synthetic multi-step arithmetic word problems in GSM8K format (the embedded default data set).

Each problem starts from a two-digit amount (10..max_start) and takes two steps, each adding or taking away
1..max_amount (default 9); every intermediate value stays in [min_value, 99]. Rows are GSM8K-shaped:
{"question", "answer"} where the answer is a short rationale ending in a final line "#### N", so data.py reads
them exactly like the official GSM8K files. `make demo` uses steps of 1..5:

    python scripts/synthetic.py --out data/synthetic --n_train 20000 --n_valid 500 --n_test 500 --seed 0 --max_amount 5

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


def _step(rng: random.Random, value: int, max_amount: int, min_value: int = 0) -> tuple[str, int, int]:
    """One operation on `value` that keeps the result in [min_value, 99]: returns (op, amount, result)."""
    can_add = value + 1 <= 99
    can_sub = value - 1 >= min_value
    op = rng.choice(["+", "-"] if can_add and can_sub else ["+"] if can_add else ["-"])
    if op == "+":
        amount = rng.randint(1, min(max_amount, 99 - value))
        return op, amount, value + amount
    amount = rng.randint(1, min(max_amount, value - min_value))
    return op, amount, value - amount


def make_problem(rng: random.Random, max_amount: int = 9, max_start: int = 99, min_value: int = 0) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(10, max_start)
    n_steps = 2
    sentences = [f"{name} has {start} {item}."]
    lines = []
    value = start
    for _ in range(n_steps):
        op, amount, result = _step(rng, value, max_amount, min_value)
        verb, tail = rng.choice(GAIN if op == "+" else LOSS)
        extra = f" {tail}" if tail else ""
        sentences.append(f"Then {name} {verb} {amount}{extra}.")
        lines.append(f"{value} {op} {amount} = {result}.")
        value = result
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = " ".join(lines) + f"\n#### {value}"
    return {"question": question, "answer": answer}


def generate(out: Path, n_train: int, n_valid: int, n_test: int, seed: int = 0, max_start: int = 99,
             min_value: int = 0, max_amount: int = 9) -> dict[str, Path]:
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
            p = make_problem(rng, max_amount, max_start, min_value)
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
    ap.add_argument("--max_start", type=int, default=99, help="starting amounts are drawn from [10, max_start]")
    ap.add_argument("--max_amount", type=int, default=9, help="each step adds or takes away 1..max_amount")
    ap.add_argument("--min_value", type=int, default=0, help="no intermediate value drops below this")
    a = ap.parse_args()
    if not 10 <= a.max_start <= 99:
        ap.error(f"--max_start {a.max_start}: expected 10..99 (two-digit starting amounts)")
    if not 1 <= a.max_amount <= 89:
        ap.error(f"--max_amount {a.max_amount}: expected 1..89")
    if not 0 <= a.min_value <= 10:
        ap.error(f"--min_value {a.min_value}: expected 0..10 (starting amounts are >= 10)")
    for split, path in generate(a.out, a.n_train, a.n_valid, a.n_test, a.seed, a.max_start,
                                a.min_value, a.max_amount).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
