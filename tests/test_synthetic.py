"""scripts/synthetic.py: the demo's generator keeps its ranges, its arithmetic and its split promises."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import synthetic  # noqa: E402

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ranges_arithmetic_and_disjoint_splits(tmp_path):
    paths = synthetic.generate(tmp_path / "a", 300, 50, 50, seed=3, max_start=59, min_value=10, max_amount=5)
    questions = {split: {r["question"] for r in _rows(p)} for split, p in paths.items()}
    assert [len(q) for q in questions.values()] == [50, 50, 300]  # test, valid, train; no duplicates
    assert not (questions["train"] & questions["test"]) and not (questions["train"] & questions["valid"])
    for row in _rows(paths["train"]):
        steps = STEP.findall(row["answer"])
        assert len(steps) == 2, row
        start = int(re.search(r"has (\d+) ", row["question"]).group(1))
        assert 10 <= start <= 59 and int(steps[0][0]) == start
        amounts = [int(x) for x in re.findall(r"Then \w+ [a-z ]+? (\d+)", row["question"])]
        assert amounts == [int(s[2]) for s in steps], row  # the rationale uses the question's amounts
        value = start
        for a, op, b, result in steps:
            a, b, result = int(a), int(b), int(result)
            assert a == value and 1 <= b <= 5
            assert result == (a + b if op == "+" else a - b) and 10 <= result <= 99
            value = result
        assert row["answer"].endswith(f"\n#### {value}")


def test_deterministic_for_a_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", 100, 10, 10, seed=0, max_amount=5)
    b = synthetic.generate(tmp_path / "b", 100, 10, 10, seed=0, max_amount=5)
    c = synthetic.generate(tmp_path / "c", 100, 10, 10, seed=1, max_amount=5)
    assert a["train"].read_bytes() == b["train"].read_bytes() != c["train"].read_bytes()


@pytest.mark.parametrize("flag", [["--max_amount", "0"], ["--max_start", "9"], ["--min_value", "11"]])
def test_bad_flags_name_the_flag(tmp_path, flag):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "synthetic.py"), "--out", str(tmp_path), *flag],
                       capture_output=True, text=True)
    assert p.returncode == 2 and flag[0] in p.stderr and "expected" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing written
