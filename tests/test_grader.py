"""grader.py: extraction and equivalence on realistic model outputs, adversarial inputs, the dev cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader import (
    RELATIVE_TOLERANCE,
    BadRow,
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
    ("\\dfrac{5}{12}", "\\frac{5}{12}", "math"), ("0.41666667", "\\frac{5}{12}", "math"),
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
    ("9999", "10000", "gsm8k"), ("0.4", "4", "gsm8k"), ("0.41667", "\\frac{5}{12}", "math"),
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


def test_relative_tolerance_applies_to_decimal_golds_only():
    # a decimal gold: agreement within RELATIVE_TOLERANCE (relative), not beyond it
    assert is_equiv("2.0001", "2.0") and 0.0001 / 2.0 < RELATIVE_TOLERANCE
    assert not is_equiv("2.0003", "2.0") and 0.0003 / 2.0 > RELATIVE_TOLERANCE
    assert is_equiv("16\\pi", "50.27")  # the exact value rounds to the decimal gold
    # an exact gold: no tolerance, however many digits
    assert not is_equiv("3.14159", "\\pi") and not is_equiv("3.14159265358979", "\\pi")
    assert not is_equiv("1000.0001", "1000") and is_equiv("1000.000", "1000")


def test_normalize_answer():
    assert normalize_answer("\\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_answer("$12{,}000$ dollars") == "12000"
    assert normalize_answer("\\left( 1, 2 \\right)") == "( 1, 2 )"


def test_grade_verdicts():
    assert grade("Thus $x = \\boxed{3}$.", "3", "math") == Verdict(True, "3", None)
    assert grade("Thus $x = \\boxed{4}$.", "3", "math") == Verdict(False, "4", "wrong")
    assert grade("Thus \\boxed{)(}", "3", "math") == Verdict(False, ")(", "parse_error")
    assert grade("nothing here", "3", "math").error_type == "no_answer"


# Rule tables: realistic responses for each rule, each with near misses the rule must still reject.
# (response, gold, dataset, correct)
RULES = {
    "unfinished responses are not answers": [
        ("Each box holds 6 eggs, so 4 boxes hold 6 * 4 = 24 eggs. She gives away", "24", "gsm8k", False),
        ("Each box holds 6 eggs, so 4 boxes hold 6 * 4 = 24 eggs, and then", "24", "gsm8k", False),
        ("The first part costs 12 + 12 = 24", "24", "gsm8k", True),  # an equation line ending on a value
        ("The first part costs 12 + 12 = 20 + 4", "24", "gsm8k", False),  # ... not on an expression
        ("Each box holds 6 eggs, so 4 boxes hold 24 eggs.", "24", "gsm8k", True),
        ("We have $a = 3$ and so $a^2 =", "9", "math", False),
        ("Since $a = 3$, we get $a^2 = 9$.", "9", "math", True),
        ("The sum is $1 + 2 + 3 = 6$, and multiplying by the next term gives", "6", "math", False),
        ("Final Answer: The final answer is $", "6", "math", False),
        ("So the answer is \\boxed{6", "6", "math", False),
        ("The product is $\\frac{3}{4} \\cdot \\frac{8}{9} = \\frac{2}{3}$ and the next factor is", "\\frac23", "math", False),
        ("The son is 14 years old, and Raymond", "14", "gsm8k", False),
        ("14", "14", "gsm8k", True),  # a bare answer is finished
    ],
    "cut off at max_new_tokens (truncated flag)": [
        ("So 6 * 4 = 24 eggs in the boxes. Next", "24", "gsm8k", False),
        ("So 6 * 4 = 24 eggs in total.", "24", "gsm8k", False),  # flag set: no marker, no credit
        ("So 6 * 4 = 24 eggs in total. The answer is 24.", "24", "gsm8k", True),  # marker before the cut
        ("Therefore the area is $\\boxed{24}$. Let me double-check by", "24", "math", True),
    ],
    "decimal approximations of exact golds are wrong": [
        ("The length is $\\boxed{2.236}$.", "\\sqrt{5}", "math", False),
        ("The length is $\\boxed{2.2360679775}$.", "\\sqrt{5}", "math", False),
        ("The length is $\\boxed{\\sqrt{5}}$.", "\\sqrt{5}", "math", True),
        ("The limit is $e^3 \\approx 20.09$.", "e^3", "math", True),  # the exact value is stated first
        ("The limit is approximately 20.09.", "e^3", "math", False),
        ("So the probability is 0.4.", "\\frac{2}{5}", "math", True),  # terminating: exactly equal
        ("So the probability is 0.43.", "\\frac{3}{7}", "math", False),
        ("So the probability is 0.42857143.", "\\frac{3}{7}", "math", True),  # >= 8 digits of a repeating expansion
        ("So the probability is 0.4285714.", "\\frac{3}{7}", "math", False),  # 7 digits: an approximation
        ("So the probability is 0.42857144.", "\\frac{3}{7}", "math", False),  # ... off by one in the last place
        ("The answer is 1000.01.", "1000", "gsm8k", False),
        ("The answer is 12.50.", "12.5", "gsm8k", True),
        ("The answer is 12.5001.", "12.5", "gsm8k", True),  # decimal gold: relative tolerance 1e-4
        ("The answer is 12.51.", "12.5", "gsm8k", False),
    ],
    "plain-text and unicode maths": [
        ("The period of the function is 2π.", "2\\pi", "math", True),
        ("The period of the function is π.", "2\\pi", "math", False),
        ("So the volume is 36π cm³.", "36\\pi", "math", True),
        ("So the volume is 36 cm³.", "36\\pi", "math", False),
        ("The solution set is (−∞, 1) ∪ (2, ∞).", "(-\\infty,1)\\cup(2,\\infty)", "math", True),
        ("The solution set is (−∞, 1] ∪ (2, ∞).", "(-\\infty,1)\\cup(2,\\infty)", "math", False),
        ("The distance is 2√13.", "2\\sqrt{13}", "math", True),
        ("The distance is √13.", "2\\sqrt{13}", "math", False),
        ("f′(x) simplifies to 3x² − 2x.", "3x^2-2x", "math", True),
        ("It simplifies to 3x² + 2x.", "3x^2-2x", "math", False),
        ("The result is 12 ÷ 4 × 3 = 9.", "9", "math", True),
        ("The angle is 120°.", "120^\\circ", "math", True),
        ("The angle is 60°.", "120^\\circ", "math", False),
        ("Each side is ¾ of a metre.", "\\frac34", "math", True),
        ("The domain is x ∈ ℝ \\ {0}.", "(-\\infty,0)\\cup(0,\\infty)", "math", True),
        ("The domain is {x | x ≠ 0}.", "(-\\infty,0)\\cup(0,\\infty)", "math", True),
        ("The domain is {x | x ≠ 1}.", "(-\\infty,0)\\cup(0,\\infty)", "math", False),
        ("As a decimal it is 0.3̅.", "\\frac13", "math", True),
        ("As a decimal it is 0.3.", "\\frac13", "math", False),
        ("The answer is sqrt(2)/2.", "\\frac{\\sqrt2}{2}", "math", True),
        ("The answer is sqrt(3)/2.", "\\frac{\\sqrt2}{2}", "math", False),
        ("The interval is (-infinity, 1).", "(-\\infty,1)", "math", True),
        ("The interval is (-infinity, 1].", "(-\\infty,1)", "math", False),
        ("The answer is 2*pi.", "2\\pi", "math", True),
        ("The answer is 2*pi/3.", "2\\pi", "math", False),
    ],
    "equivalent forms": [
        ("The answer is $3\\frac{1}{3}$.", "\\frac{10}{3}", "math", True),
        ("The answer is 3 1/3.", "\\frac{10}{3}", "math", True),
        ("The answer is 31/3.", "\\frac{10}{3}", "math", False),  # not a mixed number
        ("The answer is 3 2/3.", "\\frac{10}{3}", "math", False),
        ("So $x = \\boxed{0.\\overline{27}}$.", "\\frac{3}{11}", "math", True),
        ("So $x = \\boxed{\\frac{3}{11}}$.", "0.\\overline{27}", "math", True),
        ("So $x = 0.272727\\ldots$.", "\\frac{3}{11}", "math", True),
        ("So $x = \\boxed{0.27}$.", "\\frac{3}{11}", "math", False),
        ("So $x = \\boxed{0.\\overline{72}}$.", "\\frac{3}{11}", "math", False),
        ("The domain is $\\boxed{\\mathbb{R} \\setminus \\{2\\}}$.", "(-\\infty,2)\\cup(2,\\infty)", "math", True),
        ("The domain is $\\boxed{\\mathbb{R} \\setminus \\{-2\\}}$.", "(-\\infty,2)\\cup(2,\\infty)", "math", False),
        ("The domain is $\\boxed{\\{x \\mid x \\neq 2\\}}$.", "(-\\infty,2)\\cup(2,\\infty)", "math", True),
        ("$\\boxed{\\{x : x \\le 0 \\text{ or } x \\ge 4\\}}$", "(-\\infty,0]\\cup[4,\\infty)", "math", True),
        ("$\\boxed{\\{x : x < 0 \\text{ or } x \\ge 4\\}}$", "(-\\infty,0]\\cup[4,\\infty)", "math", False),
        ("$\\boxed{\\{x : 0 < x \\text{ and } x < 4\\}}$", "(0,4)", "math", True),
        ("The equation has no real solutions.", "\\emptyset", "math", True),
        ("$\\boxed{\\varnothing}$", "\\text{no solution}", "math", True),
        ("$\\boxed{\\{0\\}}$", "\\emptyset", "math", False),
        ("So $\\boxed{p = 4, q = -1}$.", "(4,-1)", "math", True),
        ("So $\\boxed{q = -1, p = 4}$.", "(4,-1)", "math", True),
        ("So $\\boxed{p = -1, q = 4}$.", "(4,-1)", "math", False),
        ("The solutions are $x = 3$ and $x = -7$.", "-7, 3", "math", True),
        ("The solutions are $x = -7$ and $x = 3$.", "3, -7", "math", True),
        ("The solutions are $x = 7$ and $x = -3$.", "-7, 3", "math", False),
        ("The solutions are $x = 3$ and $x = -7$ and $x = 0$.", "-7, 3", "math", False),
        ("Therefore \\boxed{\\boxed{\\frac{1}{2}}}", "\\frac12", "math", True),
        ("Therefore \\boxed{\\boxed{\\frac{1}{3}}}", "\\frac12", "math", False),
        ("The domain is all real numbers except 0.", "(-\\infty,0)\\cup(0,\\infty)", "math", True),
        ("The domain is all real numbers except 0 and 1.", "(-\\infty,0)\\cup(0,\\infty)", "math", False),
        ("The domain is all real numbers.", "(-\\infty,0)\\cup(0,\\infty)", "math", False),
        ("The decimal is 0.(45).", "\\frac{5}{11}", "math", True),
        ("The decimal is 0.(54).", "\\frac{5}{11}", "math", False),
    ],
    "words": [
        ("Yes. Every bounded monotone sequence converges.", "\\text{Yes}", "math", True),
        ("No. Every bounded monotone sequence converges.", "\\text{Yes}", "math", False),
        ("**No**, the function is not injective since $f(1) = f(-1)$.", "\\text{No}", "math", True),
        ("Not quite: it is injective.", "\\text{No}", "math", False),
        ("The number of diagonals is twenty.", "20", "math", True),
        ("The number of diagonals is twenty-one.", "20", "math", False),
        ("She read one hundred forty pages.", "140", "gsm8k", True),
        ("She read one hundred fourteen pages.", "140", "gsm8k", False),
        ("The side is $\\boxed{7 \\text{ ft}}$.", "7\\text{ feet}", "math", True),
        ("The side is $\\boxed{7 \\text{ in.}}$.", "7\\text{ feet}", "math", False),
        ("The area is 20 square inches.", "20\\text{ in}^2", "math", True),
        ("The perimeter is 20 inches.", "20\\text{ in}^2", "math", False),
        ("The function is odd.", "\\text{odd}", "math", True),
        ("The function is neither even nor odd.", "\\text{odd}", "math", False),
        ("There are a hundred students.", "100", "gsm8k", True),
        ("There are a thousand students.", "100", "gsm8k", False),
        ("The angle measures 30 degrees.", "30^\\circ", "math", True),
        ("The angle measures 30 radians.", "30^\\circ", "math", False),
    ],
    "final statement without a marker": [
        ("Each ticket costs $8. For 5 tickets, she pays $40.", "40", "gsm8k", True),
        ("Each ticket costs $8. For 5 tickets, she pays $45.", "40", "gsm8k", False),
        ("The area is 12 cm².", "12", "math", True),
        ("The area is 12 cm², about 2 cm² more than before.", "2", "math", False),
        ("After 3 weeks, he has saved 75 dollars.", "75", "gsm8k", True),
        ("After 75 weeks, he has saved 3 dollars.", "75", "gsm8k", False),
        ("He needs 9 more stamps to fill 4 pages.", "9", "gsm8k", True),
        ("So $7 \\cdot 6 = 42$ handshakes happen in total.", "42", "math", True),
        ("With $n = 5$ we get $f(5) = 31$.", "31", "math", True),
        ("With $n = 31$ we get $f(31) = 5$.", "31", "math", False),
        ("Dividing, 9 ÷ 4 = 2.25, so she needs 3 buses.", "3", "gsm8k", True),
        ("Dividing, 9 ÷ 4 = 2.25, so she needs 3 buses.", "2.25", "gsm8k", False),
    ],
}
TRUNCATED_FLAG = "cut off at max_new_tokens (truncated flag)"


@pytest.mark.parametrize("rule,response,gold,dataset,expected",
                         [(rule, *case) for rule, cases in RULES.items() for case in cases],
                         ids=[f"{rule[:20]}-{k}" for rule, cases in RULES.items() for k in range(len(cases))])
def test_rule_tables(rule, response, gold, dataset, expected):
    v = grade(response, gold, dataset, truncated=rule == TRUNCATED_FLAG)
    assert v.correct is expected, v


def test_every_rule_rejects_near_misses():
    for rule, cases in RULES.items():
        labels = [c[3] for c in cases]
        assert labels.count(True) >= 1 and labels.count(False) >= 1, rule


ADVERSARIAL = {  # name: (response, expected verdict with gold "5"); a real answer is hidden in some of them
    "10k nested braces": ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", False),
    "unclosed braces": ("\\boxed{" * 50_000, False),
    "nested parens": ("\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}", False),
    "power tower": ("\\boxed{10^{10^{10}}}", False),
    "2^2^2^2^2": ("\\boxed{2^{2^{2^{2^{2}}}}}", False),
    "huge factorial": ("\\boxed{100000!}", False),
    "1 MB response, answer at the end": ("We have $x$ and " * 70_000 + "\\boxed{5}", True),
    "1 MB of dollars": ("$" * 1_000_000, False),
    "1 MB of \\[": ("\\[" * 500_000, False),
    "1 MB prose": (("the answer is " + "a" * 1000) * 1000, False),
    "1 MB prose, answer at the end": (("we note " + "a" * 1000 + ". ") * 1000 + "The answer is 5.", True),
    "1 MB of number words": ("one two three " * 80_000 + "So the answer is five.", True),
    "1 MB of unicode maths": ("√π²×−∞ " * 150_000 + "The answer is 5.", True),
    "lone surrogates around the answer": ("the answer is 5 \ud800.", True),
    "lone surrogates, wrong answer": ("the answer is \ud800 6 \udfff.", False),
    "20k minus signs": ("\\boxed{" + "-" * 20_000 + "1}", False),
    "deep fractions": ("\\boxed{" + "\\frac{1}{" * 3_000 + "2" + "}" * 3_000 + "}", False),
    "sin of a huge number": ("\\boxed{\\sin(10^{5000})}", False),
    "long list": ("\\boxed{" + ",".join(str(i) for i in range(300)) + "}", False),
    "set-builder bomb": ("\\boxed{\\{x \\mid " + " or ".join(f"x > {i}" for i in range(300)) + "\\}}", False),
    "repeating-decimal bomb": ("The answer is 0." + "123456" * 20_000 + "...", False),
    "final-statement bomb": ("So x is " + "= " * 100_000 + "5 and", False),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_get_the_right_verdict_within_2s(name):
    response, expected = ADVERSARIAL[name]
    for dataset in ("math", "gsm8k"):
        t0 = time.perf_counter()
        v = grade(response, "5", dataset)
        elapsed = time.perf_counter() - t0
        assert isinstance(v, Verdict) and v.correct is expected, (dataset, v)
        assert (v.error_type is None) is expected  # a verdict, with a reason when it is not correct
        assert elapsed <= 2.0, f"{name} ({dataset}): {elapsed:.2f} s"


def test_refused_huge_values_are_not_equal_to_small_ones():
    assert not is_equiv("10^{10^{10}}", "10")
    assert not is_equiv("(10^{5})!", "1")


def test_grade_file_roundtrip(tmp_path):
    rows = [{"id": "a", "dataset": "gsm8k", "response": "... #### 72", "gold": "72"},
            {"id": "b", "dataset": "math", "response": "so \\boxed{\\frac{1}{2}}", "gold": "0.5"},
            {"id": "c", "dataset": "math500", "response": "no idea", "gold": "3"},
            {"id": "d", "dataset": "gsm8k", "response": "We get 12 * 3 = 36 and 36 + 28 = 64", "gold": 64,
             "finish_reason": "length"},
            {"id": "e", "dataset": "gsm8k", "response": "We get 12 * 3 = 36 and 36 + 28 = 64", "gold": 64,
             "finish_reason": "stop"},
            {"id": "f", "dataset": "gsm8k", "response": "We get 12 * 3 = 36 and 36 + 28 = 64", "gold": "64",
             "truncated": True}]
    inp, out = tmp_path / "preds.jsonl", tmp_path / "verdicts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = grade_file(str(inp), str(out))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary == {"n": 6, "correct": 3, "accuracy": 0.5, "skipped": 0}
    assert got[2] == {"id": "c", "correct": False, "extracted": None, "error_type": "no_answer"}
    assert [g["error_type"] for g in got[3:]] == ["truncated", None, "truncated"]  # finish_reason / truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "verdicts.jsonl"]  # no temp file left


BAD_ROWS = {  # line -> the words the error must contain
    '{"id": "x"}': "missing field(s) dataset, response, gold",
    '{"dataset": "math", "response": "1", "gold": "1"}': "missing field(s) id",
    '{"id": 1, "dataset": "mmlu", "response": "1", "gold": "1"}': "unknown dataset 'mmlu'",
    '{"id": 1, "dataset": "math", "response": "1", "gold": "1", "finish_reason": "cut"}': "unknown finish_reason",
    '{"id": 1, "dataset": "math", "response": "1", "gold": "1", "truncated": "yes"}': "truncated must be",
    '{"id": 1, "dataset": "math", "response": 5, "gold": "1"}': "response must be a string",
    "not json at all": "not valid JSON",
    '["a", "list"]': "expected a JSON object",
}


@pytest.mark.parametrize("line", list(BAD_ROWS))
def test_grade_file_bad_rows_name_the_line_or_are_skipped(tmp_path, line):
    good = json.dumps({"id": "g", "dataset": "math", "response": "\\boxed{1}", "gold": "1"})
    inp, out = tmp_path / "preds.jsonl", tmp_path / "verdicts.jsonl"
    inp.write_text(good + "\n\n" + line + "\n" + good + "\n")
    out.write_text("previous verdicts\n")
    with pytest.raises(BadRow, match="preds.jsonl:3: ") as e:
        grade_file(str(inp), str(out))
    assert BAD_ROWS[line] in str(e.value)
    assert out.read_text() == "previous verdicts\n"  # a failed grade leaves the old output as it was
    assert grade_file(str(inp), str(out), skip_bad_rows=True) == {"n": 2, "correct": 2, "accuracy": 1.0, "skipped": 1}
    assert len(out.read_text().splitlines()) == 2


def test_grade_file_refuses_to_overwrite_its_input(tmp_path):
    inp = tmp_path / "preds.jsonl"
    inp.write_text(json.dumps({"id": "g", "dataset": "math", "response": "\\boxed{1}", "gold": "1"}) + "\n")
    before = inp.read_bytes()
    for out in (inp, tmp_path / "." / "preds.jsonl"):
        with pytest.raises(BadRow, match="is the input file"):
            grade_file(str(inp), str(out))
    assert inp.read_bytes() == before


def _grade_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "evalmath.py"), "grade", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


CLI_FAILURES = {  # name: (input lines, extra args, words of the one error line)
    "output is the input": (['{"id": 1, "dataset": "math", "response": "\\\\boxed{1}", "gold": "1"}'],
                            ["--output", "preds.jsonl"], "is the input file"),
    "not JSON": (["{oops"], [], "preds.jsonl:1: not valid JSON"),
    "row without id": (['{"dataset": "math", "response": "1", "gold": "1"}'], [], "preds.jsonl:1: missing field(s) id"),
    "unknown dataset": (['{"id": 1, "dataset": "aime", "response": "1", "gold": "1"}'], [],
                        "preds.jsonl:1: unknown dataset 'aime'"),
    "missing gold on line 2": (['{"id": 1, "dataset": "math", "response": "1", "gold": "1"}',
                                '{"id": 2, "dataset": "math", "response": "1"}'], [], "preds.jsonl:2: missing field(s) gold"),
}


@pytest.mark.parametrize("name", list(CLI_FAILURES))
def test_grade_cli_bad_input_is_one_line_and_keeps_existing_output(tmp_path, name):
    lines, extra, words = CLI_FAILURES[name]
    (tmp_path / "preds.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "verdicts.jsonl").write_text("old verdicts\n")
    before = (tmp_path / "preds.jsonl").read_text()
    r = _grade_cli(tmp_path, "--input", "preds.jsonl", *(extra or ["--output", "verdicts.jsonl"]))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr
    assert (tmp_path / "preds.jsonl").read_text() == before  # input never wiped
    assert (tmp_path / "verdicts.jsonl").read_text() == "old verdicts\n"  # a failed grade truncates nothing


def test_grade_cli_skip_bad_rows_counts_them(tmp_path):
    rows = ['{"id": 1, "dataset": "gsm8k", "response": "The answer is 7.", "gold": "7"}', "{oops",
            '{"dataset": "math", "response": "1", "gold": "1"}',
            '{"id": 4, "dataset": "gsm8k", "response": "So she pays 8 * 5 + 8 * 3 = 64", "gold": "64", '
            '"finish_reason": "length"}']
    (tmp_path / "preds.jsonl").write_text("\n".join(rows) + "\n")
    r = _grade_cli(tmp_path, "--input", "preds.jsonl", "--output", "out/verdicts.jsonl", "--skip_bad_rows")
    assert r.returncode == 0, r.stderr
    assert "graded 2 rows: accuracy 50.00, skipped 2 bad rows" in r.stdout
    got = [json.loads(line) for line in (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()]
    assert [(g["id"], g["correct"], g["error_type"]) for g in got] == [(1, True, None), (4, False, "truncated")]


def test_dev_cases_accuracy(shared):
    cases = [json.loads(line) for line in (shared / "grader-dev" / "cases.jsonl").read_text().splitlines() if line]
    wrong = [c["id"] for c in cases if score_fn(c["prediction"], c["gold"], c["dataset"]) != c["label"]]
    assert not wrong, wrong  # the shared dev set stays at 100%


def test_own_cases_accuracy():
    path = Path(__file__).parent / "grader_cases" / "cases.jsonl"
    cases = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert len(cases) >= 250 and sum(not c["label"] for c in cases) >= 0.3 * len(cases)
    verdicts = [(c, score_fn(c["prediction"], c["gold"], c["dataset"])) for c in cases]
    wrong = [c["id"] for c, v in verdicts if v != c["label"]]
    false_positives = [c["id"] for c, v in verdicts if v and not c["label"]]
    assert len(wrong) <= 0.01 * len(cases) and len(false_positives) <= 1, (wrong, false_positives)
