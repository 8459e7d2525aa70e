"""grader.py: extraction and equivalence on realistic model outputs, adversarial inputs, the dev cases."""
from __future__ import annotations

import json

import pytest

from grader import (
    RELATIVE_TOLERANCE,
    Verdict,
    cut_continuation,
    extract_answer,
    grade,
    grade_file,
    is_equiv,
    normalize_answer,
    score_fn,
)

EXTRACTION = [  # (response, dataset, expected answer)
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "gsm8k", "72"),
    ("She earns 12/60*50 = $10.\nThe answer is $10.", "gsm8k", "10"),
    ("So the total is \\boxed{1,250} dollars.", "gsm8k", "1,250"),
    ("Total: 5 + 7 = 12 eggs. She has 12 eggs left.", "gsm8k", "12"),
    ("The answer is 18.\n\nQ: A farmer has 42 cows.", "gsm8k", "18"),
    ("Answer: 36 apples", "gsm8k", "36"),
    ("Thus the area is $\\boxed{\\frac{25\\sqrt{3}}{4}}$ square units.", "math", "\\frac{25\\sqrt{3}}{4}"),
    ("We get \\[\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}\\]", "math", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("so $x = \\boxed{2}$ or $x = \\boxed{-3}$.", "math", "2, -3"),
    ("Final Answer: The final answer is $[2,5)$. I hope it is correct.", "math", "[2,5)"),
    ("Hence the remainder is $\\boxed{4}$. Checking again ... Final Answer: The final answer is $6$. "
     "I hope it is correct.", "math", "6"),
    ("Final Answer: The volume of $ABCD$ is 120. I hope it is correct.", "math", "120"),
    ("Therefore the probability is 2/3.", "math", "2/3"),
    ("The identity matrix is $\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}$.", "math", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
    ("\\frac{1}{2} + 2/3", "math", "\\frac{1}{2} + 2/3"),
    ("The answer is \\boxed{5}.\nProblem:\nFind \\boxed{7}.", "math", "5"),
]


@pytest.mark.parametrize("response,dataset,expected", EXTRACTION)
def test_extract_answer(response, dataset, expected):
    assert extract_answer(response, dataset) == (expected, None)


def test_no_answer_and_truncated_errors():
    assert extract_answer("I am not sure how to solve this.", "math") == (None, "no_answer")
    assert extract_answer("Let me compute \\[\\frac{386}{64} - 7 = \\frac{-62}", "math") == (None, "truncated")
    v = grade("We compute 12 * 3 = 36 and then 36 + 28 = 64", "64", "gsm8k", truncated=True)
    assert v == Verdict(False, "64", "truncated")  # the last number matches, but no answer was given
    assert grade("... so the answer is \\boxed{64}", "64", "math", truncated=True).correct


def test_cut_continuation():
    assert cut_continuation("The answer is 3.\n\nQuestion: what is 2+2?\nAnswer: 4") == "The answer is 3."
    assert cut_continuation("x = 3<|im_start|>user") == "x = 3"
    assert cut_continuation("Problem: restated\nsolution 5") == "Problem: restated\nsolution 5"


EQUIVALENT = [  # (prediction, gold, dataset)
    ("7,425,000", "7425000", "gsm8k"), ("$1,000.99", "1000.99", "gsm8k"), ("1 000", "1000", "gsm8k"),
    (".4", "0.4", "gsm8k"), ("1000.0", "1000", "gsm8k"), ("−5", "-5", "gsm8k"), ("1.2e3", "1200", "gsm8k"),
    ("\\dfrac{5}{12}", "\\frac{5}{12}", "math"), ("0.41667", "\\frac{5}{12}", "math"),
    ("2\\sqrt{2}", "\\sqrt{8}", "math"), ("\\pi/4", "\\frac{\\pi}{4}", "math"), ("45^\\circ", "45", "math"),
    ("(-\\infty, 3]", "(-\\infty,3]", "math"), ("x \\le 3", "(-\\infty,3]", "math"),
    ("5 \\geq x", "x \\leq 5", "math"), ("-2 \\le x \\le 7", "x \\in [-2, 7]", "math"),
    ("[-1, -\\tfrac12) \\cup (-\\tfrac12, 0)", "[-1,-\\frac{1}{2})\\cup(-\\frac{1}{2},0)", "math"),
    ("\\{1, 2, 3\\}", "\\{3,2,1\\}", "math"), ("-2, 1", "1,-2", "math"), ("\\pm 2", "-2, 2", "math"),
    ("\\begin{bmatrix}1 & 2\\\\ 3 & 4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "math"),
    ("y = 2x + 3", "2x - y + 3 = 0", "math"), ("x = 11", "11", "math"), ("k=\\frac13", "\\frac{1}{3}", "math"),
    ("x^2 + 2x + 1", "(x+1)^2", "math"), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", "math"),
    ("\\sec^2 y", "\\tan^2(y) + 1", "math"), ("3 + 2i", "3+2i", "math"), ("\\text{(B)}", "B", "math"),
    ("5!", "120", "math"), ("\\binom{6}{2}", "15", "math"), ("2^{100}", "1267650600228229401496703205376", "math"),
    ("\\sqrt[3]{27}", "3", "math"), ("\\log_2 8", "3", "math"), ("e^{i\\pi}", "-1", "math"),
    ("twelve", "12", "math"), ("1.5\\times10^{3}", "1500", "math"), ("50\\%", "50", "math"),
    ("12\\text{ cm}^2", "12", "math"), ("64 square feet", "64", "math"), ("5 \\text{ million}", "5000000", "math"),
    ("3\\frac{1}{4}", "\\frac{13}{4}", "math"), ("\\$1,\\!234.50", "1234.5", "math"), ("14{,}916", "14916", "math"),
    ("\\text{Evelyn}", "Evelyn", "math"), ("(1, 4.5)", "(1,\\frac{9}{2})", "math"), ("004", "4", "math"),
    ("(5,8) and (8,5)", "(8, 5), (5, 8)", "math"), ("\\frac94\\pi", "\\frac{9}{4}\\pi", "math"),
]
NOT_EQUIVALENT = [
    ("9999", "10000", "gsm8k"), ("0.4", "4", "gsm8k"), ("0.4166", "\\frac{5}{12}", "math"),
    ("(-\\infty, 3)", "(-\\infty,3]", "math"), ("x < 3", "(-\\infty,3]", "math"), ("x > -1", "x < 1", "math"),
    ("(1, 2, 3)", "(3,2,1)", "math"), ("(7,6)", "(6,7)", "math"), ("\\{1,3\\}", "(3,1)", "math"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "math"),
    ("y = 2x - 3", "y = 2x + 3", "math"), ("0", "a + 3z = 0", "math"), ("x^2 + 2x + 2", "(x+1)^2", "math"),
    ("y^2+2y+1", "x^2+2x+1", "math"), ("3 - 2i", "3+2i", "math"), ("-\\frac{3}{4}", "0.75", "math"),
    ("x", "y", "math"), ("2021", "\\pm 2021", "math"), ("12", "1,2", "math"), ("1234", "(1,234)", "math"),
    ("4:30 \\text{ a.m.}", "\\text{4:30 p.m.}", "math"), ("1112122_3", "1112112_3", "math"),
    ("2 \\sin a \\cos b", "2 \\sin b \\cos a", "math"), ("f(1) < f(2)", "f(2) < f(1)", "math"),
]


@pytest.mark.parametrize("pred,gold,dataset", EQUIVALENT)
def test_equivalent(pred, gold, dataset):
    assert is_equiv(pred, gold, dataset)


@pytest.mark.parametrize("pred,gold,dataset", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold, dataset):
    assert not is_equiv(pred, gold, dataset)


def test_relative_tolerance_is_documented_value():
    assert RELATIVE_TOLERANCE == 1e-4
    assert is_equiv("3.14159", "\\pi") and not is_equiv("3.14", "\\pi")


def test_normalize_answer():
    assert normalize_answer("\\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_answer("$12{,}000$ dollars") == "12000"
    assert normalize_answer("\\left( 1, 2 \\right)") == "( 1, 2 )"


def test_grade_verdicts():
    assert grade("Thus $x = \\boxed{3}$.", "3", "math") == Verdict(True, "3", None)
    assert grade("Thus $x = \\boxed{4}$.", "3", "math") == Verdict(False, "4", "wrong")
    assert grade("Thus \\boxed{)(}", "3", "math") == Verdict(False, ")(", "parse_error")
    assert grade("nothing here", "3", "math").error_type == "no_answer"


ADVERSARIAL = {
    "10k nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "unclosed braces": "\\boxed{" * 50_000,
    "nested parens": "\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}",
    "power tower": "\\boxed{10^{10^{10}}}",
    "2^2^2^2^2": "\\boxed{2^{2^{2^{2^{2}}}}}",
    "huge factorial": "\\boxed{100000!}",
    "1 MB response": "We have $x$ and " * 70_000 + "\\boxed{5}",
    "1 MB of dollars": "$" * 1_000_000,
    "1 MB of \\[": "\\[" * 500_000,
    "1 MB prose": ("the answer is " + "a" * 1000) * 1000,
    "lone surrogates": "the answer is \ud800 5 \udfff",
    "20k minus signs": "\\boxed{" + "-" * 20_000 + "1}",
    "deep fractions": "\\boxed{" + "\\frac{1}{" * 3_000 + "2" + "}" * 3_000 + "}",
    "sin of a huge number": "\\boxed{\\sin(10^{5000})}",
    "long list": "\\boxed{" + ",".join(str(i) for i in range(300)) + "}",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_return_a_verdict(name):
    for dataset in ("math", "gsm8k"):
        v = grade(ADVERSARIAL[name], "5", dataset)
        assert isinstance(v, Verdict)
        assert v.correct == (name == "1 MB response") or name == "lone surrogates"


def test_refused_huge_values_are_not_equal_to_small_ones():
    assert not is_equiv("10^{10^{10}}", "10")
    assert not is_equiv("(10^{5})!", "1")


def test_grade_file_roundtrip(tmp_path):
    rows = [{"id": "a", "dataset": "gsm8k", "response": "... #### 72", "gold": "72"},
            {"id": "b", "dataset": "math", "response": "so \\boxed{\\frac{1}{2}}", "gold": "0.5"},
            {"id": "c", "dataset": "math", "response": "no idea", "gold": "3"}]
    inp, out = tmp_path / "preds.jsonl", tmp_path / "verdicts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = grade_file(str(inp), str(out))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["correct"] == 2 and summary["n"] == 3
    assert got[2] == {"id": "c", "correct": False, "extracted": None, "error_type": "no_answer"}
    inp.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="preds.jsonl:1"):
        grade_file(str(inp), str(out))


def test_dev_cases_accuracy(shared):
    cases = [json.loads(line) for line in (shared / "grader-dev" / "cases.jsonl").read_text().splitlines() if line]
    right = sum(score_fn(c["prediction"], c["gold"], c["dataset"]) == c["label"] for c in cases)
    assert right / len(cases) >= 0.99, f"{right}/{len(cases)}"
