"""Answer extraction and equivalence for GSM8K and MATH (evalmath's grader).

    from grader import grade, extract_answer, is_equiv, Verdict
    grade(response, gold, dataset, truncated=False) -> Verdict(correct, extracted, error_type)

Extraction (first rule that succeeds, on the response cut before a run-on `Question:`/`Q:`/`Problem:`):
the last brace-balanced `\\boxed{}`/`\\fbox{}` (adjacent boxes joined into a list, nested boxes are one);
"final answer is" / "the answer is"; `#### N`; an `Answer: N` line. Without such a marker:
- an unfinished response is no answer (error_type "truncated"): one cut off inside an open `\\[`/`\\(`/`$$`,
  or whose last line stops mid-sentence (_unfinished); `truncated=True` (the generation hit its token limit)
  also refuses an unmarked answer, so only a marker written before the cut counts;
- a short bare answer is the whole response; otherwise the answer is read from the final statement
  (_final_statement): the value after its last copula ("The area is 12 cm²." -> 12 cm², not its first
  number), in its last clause ("..., so she needs 2 cars."), with numbers in words read as numbers;
- a yes/no gold is answered by a response or final sentence that starts with Yes or No (_yes_no).

Equivalence: normalised strings (unicode and plain-text maths become LaTeX: mathparse.unicode_to_latex;
repeating decimals, mixed numbers and "≈ decimal" tails: _exact_forms; numbers in words; units: _trailing_unit).
Plain numbers compare exactly unless the gold is itself a decimal (_tolerance: a decimal approximation of an
exact gold such as `1.414` for `\\sqrt{2}` is wrong). Otherwise both sides go through a small
recursive-descent LaTeX/plain-math parser (mathparse.py) into sympy objects and structures (lists/sets,
tuples/intervals, unions, set-builder and set-difference regions, matrices, relations, assignments).
Expressions are equal if sympy's canonical forms agree, or if they agree numerically at three fixed points for
their free symbols (a Schwartz-Zippel style identity test); relations, intervals and sets of reals are
compared as regions of the real line at all their endpoints, just beside them and between them.

Safety: model output is untrusted. Nothing here calls eval, sympify, parse_expr or simplify. Every
operation is bounded up front instead of timed out from outside (which would need the main thread or
a process pool): the response is cut to its last MAX_RESPONSE_CHARS characters, an answer longer than
MAX_ANSWER_CHARS is compared as a string only, the parser refuses nesting deeper than MAX_DEPTH, exact
powers whose result would exceed MAX_POW_BITS bits and factorials/binomials above MAX_FACTORIAL, and the
numeric checks use plain Python floats (mpmath-free). A cooperative deadline (TIME_BUDGET_S) is checked
between steps as a last guard; exceeding it gives error_type "timeout". So grade() is safe in any thread
and never hangs the evaluation process.
"""
from __future__ import annotations

import cmath
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import sympy as sp

from mathparse import (
    MAX_ANSWER_CHARS,
    parse_math,
    repeating_decimal,
    unicode_to_latex,
    words_to_digits,
    words_value,
)
from mathparse import Refused as _Refused

RELATIVE_TOLERANCE = 1e-4  # numbers (and expressions at sample points) agree within this relative error
MAX_RESPONSE_CHARS = 64_000  # only the tail of a longer response is searched for the answer
TIME_BUDGET_S = 2.0  # cooperative deadline per comparison
EXPLICIT_METHODS = ("boxed", "answer_is", "hashes", "answer_line")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    error_type: str | None  # None when correct; else no_answer, truncated, parse_error, timeout, wrong


class _Timeout(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# Extraction

_CONTINUATION = re.compile(r"\n\s*(?:Question|Q|Problem)\s*:|<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>"
                           r"|<\|eot_id\|>|</s>")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_BOX_GAP = re.compile(r"(?:\s|[,;.$]|\\[()\[\]]|\\q?quad|\\text\{[^{}]*\}|\band\b|\bor\b|&|\\\\)*")
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer) (?:is|would be|will be)\s*:?", re.I)
_HOPE = re.compile(r"\.?\s*I hope it is correct", re.I)
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_LINE = re.compile(r"^[ \t>*#]*(?:final\s+)?answer\s*[:：][ \t*]*(.*)$", re.I | re.M)
_MATH_ENV = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<!\\)\$(.+?)(?<!\\)\$", re.S)
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])%?"
                     r"|(?<![A-Za-z0-9])-?\.\d+")
_GSM_NUMBER = re.compile(r"(?<![A-Za-z0-9])-?(?:\d{1,3}(?:(?:,| (?=\d{3}(?!\d)))\d{3})+|\d+)(?:\.\d+)?"
                         r"(?:[eE][-+]?\d+(?![\d.]))?|(?<![\w.])-?\.\d+")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_IS_SPLIT = re.compile(r"\s(?:is|are|was|equals|be|of)\s", re.I)


def _clean(text: str) -> str:
    """Untrusted text to a bounded str (its tail) with lone surrogates dropped."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    return text.encode("utf-8", "ignore").decode("utf-8").replace("\u2212", "-")


def cut_continuation(response: str) -> str:
    """Drop a run-on continuation: the model starting a new `Question:`/`Q:`/`Problem:` or chat turn."""
    m = _CONTINUATION.search(response, 1)
    return response[: m.start()] if m and response[: m.start()].strip() else response


def _brace_group(text: str, start: int, limit: int = 4 * MAX_ANSWER_CHARS) -> int:
    """Index just past the brace group opening at text[start] == '{', or -1 if unbalanced within limit."""
    depth, i, n = 0, start, min(len(text), start + limit)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Balanced boxes near the end: (start, end, content), last first, adjacent boxes only; a box nested in
    another (`\\boxed{\\boxed{12}}`) is the outer box."""
    out = []
    for m in reversed(list(_BOX.finditer(text))[-20:]):
        if m.end() < len(text) and text[m.end()] == "{":
            end = _brace_group(text, m.end())
            if end < 0:
                continue  # cut off inside the box
            content = text[m.end() + 1: end - 1]
        else:
            tail = re.match(r"[^\s$]+", text[m.end():])
            if not tail:
                continue
            end, content = m.end() + tail.end(), tail.group(0)
        if out:
            gap = re.sub(r"_\{?\w+\}?", "", text[end: out[-1][0]])
            gap_ok = _BOX_GAP.fullmatch(gap) or (len(gap) <= 40 and not re.search(r"\d|\.\s|\n\n|=.*=", gap))
            if not gap_ok:
                break
        out.append((m.start(), end, content))
    return [b for b in out if not any(o[0] < b[0] and b[1] <= o[1] for o in out)]  # nested: the outer one


def _reduce_prose(ans: str) -> str:
    """'The volume of $V$ is 120' -> '120'; 'Jane started 3 hours ago' -> '3'."""
    ans = ans.strip().strip('"').strip()
    for _ in range(3):
        bare = _MATH_ENV.sub(" ", ans)
        if len(_PROSE_WORD.findall(re.sub(r"\\[a-zA-Z]+(\{[^{}]*\})?", " ", bare))) < 2:
            return ans
        parts = _IS_SPLIT.split(ans)
        if len(parts) > 1 and parts[-1].strip():
            ans = parts[-1].strip()
            continue
        last = _last_candidate(ans)
        return last if last is not None else ans
    return ans


def _sentence(tail: str) -> str:
    """The answer at the start of `tail`: a leading math environment, else up to the sentence end."""
    tail = tail.lstrip()[:2 * MAX_ANSWER_CHARS]
    m = _MATH_ENV.match(tail)
    if m and not re.match(r"[ \t]*[\w\\{(]", tail[m.end():]):
        return next(g for g in m.groups() if g is not None)
    m = re.match(r"(.*?)(?:\.(?=\s|$)|\n|$)", tail, re.S)
    return m.group(1)


def _last_candidate(text: str) -> str | None:
    """The math environment or bare number that ends last in text (only its tail is searched, which also
    bounds the regex work on adversarial text)."""
    text = text[-2 * MAX_ANSWER_CHARS:]
    envs = list(_MATH_ENV.finditer(text))
    env = envs[-1] if envs else None
    blanked = _MATH_ENV.sub(lambda m: " " * len(m.group(0)), text)
    nums = list(_NUMBER.finditer(blanked))
    num = nums[-1] if nums else None
    if env and (not num or env.end() > num.end()):
        content = next(g for g in env.groups() if g is not None)
        after = re.match(r"\s*(\\?%|percent\b|pct\b)", text[env.end():])
        return content + ("%" if after else "")
    return num.group(0) if num else None


_MARKDOWN = re.compile(r"\*\*|__|`+|^\s*(?:[-*>]|#+|\d+\.)\s+", re.M)
_TERMINAL = re.compile(r"(?:[.!?。)\]]|\$|\\\]|\\\)|\*\*)[\s\"'*_]*$")
_CALCULATOR = re.compile(r"<<[^<>\n]{0,200}>>")
_DANGLING = re.compile(r"(?:[=+\-*/×÷,:;(\[{^_]|\\[a-zA-Z]+|\b(?:and|or|but|the|a|an|of|to|is|are|was|were|be|by|for|"
                       r"with|which|that|this|these|then|so|we|he|she|it|they|his|her|its|their|our|gives|giving|get|"
                       r"gets|as|in|on|at|from|than|plus|minus|into|per|each|every|if|when|because|since|"
                       r"after|before|while|where|will|would|can|has|have|had|need|needs|let|us|there)\b)\s*$", re.I)
_COPULA = re.compile(r"\b(?:is|are|was|were|equals|equal|be|being|becomes|gives|get|gets|got|makes|yields|has|have|had"
                     r"|(?:simplifies|reduces|evaluates|comes|amounts|works out|equal|equals|rounds) to"
                     r"|(?:factors|factored|written|expressed|rewritten|simplified) as|total of)\b"
                     r"|(?<![<>!=])=(?!=)|:(?=\s)", re.I)
_FILLER = re.compile(r"^(?:\s*(?:equal to|exactly|then|now|just|only|simply|given by|a total of|therefore|thus|so|at|"
                     r"still|also)\b|\s*[:,])+", re.I)
_RUN_TOKEN = re.compile(r"\s*(?:(?P<env>\$\$.+?\$\$|(?<!\\)\$.+?(?<!\\)\$|\\\(.+?\\\)|\\\[.+?\\\])"
                        r"|(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*(?:\(\d+\)|\\overline\s*\{\d+\})|\.\d+(?:\.\.\.|\\ldots|…)?)?)"
                        r"|(?P<cmd>\\[a-zA-Z]+|\\[{}%$]|\\(?=\s))|(?P<op>[-+*/^=<>()\[\]{}|!_,%'≤≥≠]|\.(?=\d))"
                        r"|(?P<word>[A-Za-z]+\.?))", re.S)
_STATEMENT = re.compile(r"\b(?:is|are|was|were|so|thus|hence|therefore|then|we|the|i\.e)\b|[.!?]\s*$", re.I)
_CLAUSE = re.compile(r"(?:,|;|\band|(?<=\$))\s+(?=(?:so|thus|hence|therefore|which means|giving|i\.e\.|that is)\b)"
                     r"|\s(?=which (?:implies|means|gives)\b)"
                     r"|\bi\.e\.,?", re.I)
_ADVERBIAL = re.compile(r"\b(?:(?:in|after|for|at|per|within|during|every|each|over|before)\s+(?:the\s+(?:next\s+|first\s+"
                        r"|last\s+)?)?\$?|to\s+[a-z]+\s+(?:the\s+)?|(?:after|before|by|when|while|from)\s+[a-z]+ing\s+"
                        r"(?:[a-z]+\s+){0,2}\$?)\d+(?:[.:]\d+)?(?:\s*(?:[ap]\.?m\.?\b))?", re.I)
_ALL_REALS = re.compile(r"\ball real (?:numbers|values)(?:\s+(?:of\s+[a-z]\s+)?(?:except|other than|but|excluding)\s+"
                        r"(?:for\s+)?(?:[a-z]\s*=\s*)?(-?[\w.\\{}/]+(?:\s*(?:,|and|or)\s*-?[\w.\\{}/]+)*))?", re.I)
_SEPARATORS = {",", "and", "or", "=", "+", "-", "*", "/", "^", "_", "<", ">", "≤", "≥", "≠", "(", "[", "{", "|"}


_ALIGN = re.compile(r"\\begin\{(align|aligned|eqnarray|gather|equation|split)(\*?)\}(.{0,4000}?)\\end\{\1\2\}", re.S)


def _last_row(m: re.Match) -> str:
    """An align/eqnarray block as display maths holding its last row (`&= 6 - 5i` -> `\\[= 6 - 5i\\]`)."""
    rows = [r for r in re.split(r"\\\\(?:\[[^\]]*\])?", m.group(3)) if r.strip()]
    row = rows[-1].replace("&", " ").strip().lstrip("=").strip() if rows else ""
    return f"\\[{row}\\]" if row else " "


def _unfinished(text: str) -> bool:
    """An unmarked response is unfinished (not an answer) when its last line stops mid-sentence: it ends on an
    operator or a function word ('... = 24 and', '... which gives'), or it has no closing punctuation or math
    delimiter and is not a statement that ends on a value and at most 5 words after its last `=` or copula
    (`5 × 7 = 35`, 'So he is 180-135=45 miles away from home')."""
    lines = text.rstrip().split("\n")
    last = lines[-1].strip()
    if last.endswith("$") and not last.endswith("$$") and len(re.findall(r"(?<!\\)\$", text)) % 2:
        return True  # a '$' that opens maths (or an amount) and nothing after it
    if not last or _TERMINAL.search(last):
        return False
    if _DANGLING.search(last):
        return True
    if len(lines) == 1 and len(last) <= 80 and not _STATEMENT.search(last):
        return False  # a bare answer
    tail = last.split("=") if "=" in last else re.split(r":\s|\b(?:is|are|was|equals)\b", last)
    return len(tail) < 2 or not re.fullmatch(r"\s*[-$€£]?\s?\d[\d,.]*[%€£¥°²³…]*(?:\s*/?\s*[A-Za-z0-9'’-]+[²³]?){0,5}\s*",
                                              tail[-1])


def _sentences(text: str) -> list[str]:
    """Sentences and lines of text (math environments are never split)."""
    blank = _MATH_ENV.sub(lambda m: "x" * len(m.group(0)), text)
    cuts = [m.end() for m in re.finditer(r"[.!?;](?=\s|$)|\n", blank)]
    cuts += [m.end() for m in _MATH_ENV.finditer(text) if (m.group(0)[:2] in ("$$", "\\[")
             and (m.group(0)[:-2].rstrip().endswith(".") or re.match(r"\s+[A-Z]", text[m.end():])))
             or (m.group(0)[:-1].rstrip().endswith(".") and re.match(r"\s+[A-Z]|\s*$", text[m.end():]))]
    cuts = [0] + sorted(cuts) + [len(text)]
    return [text[a:b].strip() for a, b in zip(cuts, cuts[1:]) if text[a:b].strip(" \n.!?;")]


def _leading_value(pred: str) -> str | None:
    """The maths at the start of a predicate: '8 centimeters shorter at 5 PM' -> '8 centimeters',
    'x = 5 and x = -2.' -> 'x = 5 and x = -2', '$\\frac{1}{2}$, which ...' -> '\\frac{1}{2}'."""
    pred = _FILLER.sub("", pred).strip()
    toks, pos, kinds = [], 0, []
    while True:
        m = _RUN_TOKEN.match(pred, pos)
        if not m:
            break
        kind, val = m.lastgroup, m.group(m.lastgroup)
        if val == "\\approx" and toks:
            break  # '25\\pi \\approx 78.54': the exact value comes first
        if kind == "word":
            nxt = _RUN_TOKEN.match(pred, m.end())
            nkind = nxt.lastgroup if nxt else None
            prev = kinds[-1] if kinds else None
            w = val.lower().rstrip(".")
            if w == "or" and toks and toks[-1][1] in (",", "("):
                break  # '3/8, or 37.5%': a restatement follows
            if w in ("and", "or") and prev and nkind in ("num", "env", "cmd", "op", "word"):
                pass
            elif len(w) == 1 and (prev in ("num", "op", "cmd") or nkind == "cmd"
                                  or (nkind == "op" and nxt.group("op") in "=+-*/^_<>≤≥≠!(")):
                pass
            elif _unit_key(w) is not None and prev in ("num", "op", "word", "env") and any(k in ("num", "env") for k in kinds):
                pass
            else:
                break
        toks.append((kind, val, m.start(), m.end()))
        kinds.append(kind)
        pos = m.end()
    while toks and (toks[-1][1].lower() in _SEPARATORS):
        toks.pop()
    if not toks or not any(k in ("num", "env", "cmd") or (k == "word" and len(v) == 1) for k, v, _, _ in toks):
        return None
    envs = [_env_content(v) for k, v, _, _ in toks if k == "env"]
    if envs and all(k == "env" or v.lower() in (",", "and") for k, v, _, _ in toks):
        if len(envs) > 1 and not all(re.fullmatch(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*=[^=]+", e) for e in envs):
            return envs[-1]  # '$k - 1 = 1$, and $k = 2$': the last statement
        return ", ".join(envs)  # '$x = 2$, $y = -3$': a system's solution
    return pred[toks[0][2]: toks[-1][3]].strip()


def _env_content(env: str) -> str:
    m = _MATH_ENV.fullmatch(env)
    return next(g for g in m.groups() if g is not None).strip().rstrip(".,;").strip() if m else env


def _statement_answer(sentence: str) -> str | None:
    """The answer of one final statement, read from its last clause that holds one ('..., so she needs 2 cars'
    -> '2'; '..., i.e. 2/3' -> '2/3'): the value after the clause's last copula ('is', 'are', 'equals', '=',
    'gets', 'factors as', ...; `x = 5` is a value, not a copula) that starts with maths; when the predicate is
    a few words, the subject if it is maths ('7 is the remainder') else those words ('$f$ is an even function',
    'there are no real roots'); else the clause itself if it is maths; else its last math environment or
    number outside adverbial phrases ('in 2 hours', 'to buy 3 books'). Number words in a sentence without digits outside its
    maths are read as numbers ('twelve toys' -> '12 toys')."""
    s = unicode_to_latex(_MARKDOWN.sub("", sentence)).strip().rstrip(".!?;").strip()
    if not re.search(r"\d", _MATH_ENV.sub(" ", s)):
        s = words_to_digits(s)
    m = _ALL_REALS.search(s)
    if m:  # 'all real numbers except 0 and 1' -> R \ {0, 1}
        return r"\mathbb{R}" + (r"\setminus\{" + re.sub(r"\s*(?:,|\band\b|\bor\b)\s*", ", ", m.group(1)) + r"\}"
                                if m.group(1) else "")
    blank = _MATH_ENV.sub(lambda m: "x" * len(m.group(0)), s)
    cuts = [0] + [m.end() for m in _CLAUSE.finditer(blank)]
    for start in reversed(cuts):
        clause, cblank = s[start:], blank[start:]
        for m in reversed(list(_COPULA.finditer(cblank))):
            if m.group(0) == "=" and re.search(r"(?:^|[\s,(])[A-Za-z](?:_\{?\w+\}?)?\s*$", cblank[:m.start()]):
                continue  # x = 5 is the value itself
            pred = clause[m.end():]
            value = _leading_value(pred)
            if value:
                return value
            words = _FILLER.sub("", pred).strip()
            if re.fullmatch(r"[A-Za-z]+(?:[\s-]+[A-Za-z]+){0,3}", words):
                subject = _whole_value(_FILLER.sub("", clause[:m.start()].split(",")[-1]))
                if subject and not re.fullmatch(r"\s*[A-Za-z]\s*", subject):
                    return subject  # '7 is the remainder', '4 + 5 + 6 = 15 apples were picked'
                if not re.search(r"\d", re.sub(r"\$\s*[A-Za-z]\s*\$", " ", clause)):
                    return words  # 'an even function', 'no real roots' (not '14 years since he was born')
            break
        value = _whole_value(clause)
        if value:
            return value  # the clause is the maths itself: 'x \\in (-\\infty, 1)'
        last = _last_candidate(_ADVERBIAL.sub(lambda m: " " * len(m.group(0)), clause)) or _last_candidate(clause)
        if last:
            unit = re.search(re.escape(last) + r"\s*((?:square|cubic)\s+)?([A-Za-z]+)", clause)
            return f"{last} {unit.group(0)[len(last):].strip()}" if unit and _UNIT_OF.get(unit.group(2).lower()) \
                else last  # '30 radians' keeps its unit
    return None


def _whole_value(text: str) -> str | None:
    """The maths that makes up all of text (up to closing punctuation), else None."""
    value = _leading_value(text)
    if value and value in text and re.fullmatch(r"(?:[\s.,;!?$]|\\[)\]])*", text[text.rfind(value) + len(value):]):
        return value
    return None


def _final_statement(text: str) -> str | None:
    """No answer marker: the answer is in the final statement (the last sentence holding one, of the last 3)."""
    for sentence in reversed(_sentences(_HOPE.split(text)[0])[-3:]):
        ans = _statement_answer(sentence)
        if ans:
            return ans
    return None


def _extract(response: str, dataset: str) -> tuple[str | None, str]:
    """(answer, method) or (None, error_type)."""
    text = _CALCULATOR.sub("", cut_continuation(_clean(response)))  # GSM8K's <<48/2=24>> annotations
    gsm = dataset.lower().startswith("gsm")
    if gsm:  # '$' before or after an amount is currency, not a math delimiter
        text = re.sub(r"(?<!\\)\$(?=\s?-?[\d.])|(?<=\d)\$(?!\$)", "", text)
    ans, method = None, ""
    boxes = _boxes(text)
    if boxes:
        contents = list(dict.fromkeys(c.strip() for _, _, c in reversed(boxes)))
        ans, method = ", ".join(contents), "boxed"
    hits = list(_ANSWER_IS.finditer(text))
    if hits and (ans is None or hits[-1].start() > boxes[0][1]):
        cand = _sentence(_HOPE.split(text[hits[-1].end():])[0])
        cand = _reduce_prose(re.split(r",?\s+(?:because|since|as|which|where|given that)\b", cand)[0] or cand)
        later = ans is not None and len(_PROSE_WORD.findall(_MATH_ENV.sub(" ", cand))) == 0
        if cand.strip() and (ans is None or later):
            ans, method = cand, "answer_is"
    if ans is None:
        hits = list(_HASHES.finditer(text))
        if hits:
            ans, method = hits[-1].group(1), "hashes"
    if ans is None:
        hits = [m for m in _ANSWER_LINE.finditer(text)]
        if hits:
            line = hits[-1].group(1).strip() or text[hits[-1].end():].strip().split("\n")[0]
            line = _HOPE.split(line)[0]
            if line.strip():
                ans, method = _reduce_prose(line), "answer_line"
    if ans is None:
        open_env = text.rfind("\\[") > text.rfind("\\]") or text.rfind("\\(") > text.rfind("\\)") \
            or text.count("$$") % 2 == 1
        text = _ALIGN.sub(_last_row, text)
        if open_env or _unfinished(text):
            return None, "truncated"
        if len(text) <= 80 and "\n" not in text.strip() and not _MATH_ENV.search(text) and not _STATEMENT.search(text) \
                and (len(_PROSE_WORD.findall(text)) < 3 if re.search(r"[\d\\]", text) else " " not in text.strip()):
            ans, method = text, "whole"
        else:
            ans, method = _final_statement(text), "final_statement"
    if ans is None or not ans.strip():
        return None, "no_answer"
    ans = ans.strip()
    if gsm and _plain_number(ans) is None:  # "18 apples", "$18", "25 m^{2}": keep the number
        ans = re.sub(r"(?<=[A-Za-z])\^\{?[23]\}?", "", ans)
        rhs = ans.split("=")[-1]  # 'X = 26', '1+5+2 = 8 oranges'
        nums = _GSM_NUMBER.findall(rhs)
        rest = _GSM_NUMBER.sub(" ", rhs)
        if nums and not re.search(r"[\d^!+*/=()<>]", re.sub(r"(?<=[A-Za-z])/(?=[A-Za-z])", " ", rest)):
            ans = nums[-1]
    return ans, method


def extract_answer(response: str, dataset: str) -> tuple[str | None, str | None]:
    """The final answer in a model response: (answer, None), or (None, error_type)."""
    ans, how = _extract(response, dataset)
    return (ans, None) if ans is not None else (None, how)


# ----------------------------------------------------------------------------------------------------
# Normalisation

_UNITS = set("""
unit units sq square squared cubic cu meter meters metre metres m cm mm km kilometer kilometers
centimeter centimeters millimeter millimeters inch inches in ft foot feet yard yards yd mile miles mi
mph kmh kph hour hours hr hrs h minute minutes min mins second seconds sec secs s day days week weeks
month months year years yr yrs degree degrees deg radian radians rad dollar dollars cent cents usd
euro euros yuan pound pounds lb lbs ounce ounces oz gram grams g kg kilogram kilograms liter liters
litre litres l ml gallon gallons gal quart quarts pint pints cup cups mile² m² cm² km² ft² percent pct
people person persons students student apples marbles cookies points times ways handshakes
""".split())
_MULTIPLIERS = {"thousand": "10^{3}", "million": "10^{6}", "billion": "10^{9}", "trillion": "10^{12}"}
_TEXT_CMDS = r"text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathsf|operatorname|rm|bf|boldsymbol"
_TRAILING_TEXT = re.compile(r"\\(?:" + _TEXT_CMDS + r")\s*\{([^{}]*)\}\s*(?:\^\s*\{?\d\}?)?\s*$")


_UNIT_NAMES = {  # canonical unit: its spellings (plural and abbreviations)
    "in": "in in. inch inches", "ft": "ft ft. foot feet", "yd": "yd yard yards", "mi": "mi mile miles",
    "m": "m meter meters metre metres", "cm": "cm centimeter centimeters centimetre centimetres",
    "mm": "mm millimeter millimeters", "km": "km kilometer kilometers kilometre kilometres",
    "h": "h hr hrs hour hours", "min": "min mins minute minutes", "s": "s sec secs second seconds",
    "day": "day days", "week": "week weeks", "month": "month months", "year": "yr yrs year years",
    "deg": "deg degree degrees", "rad": "rad radian radians", "cent": "cent cents", "dollar": "dollar dollars",
    "lb": "lb lbs pound pounds", "oz": "oz ounce ounces", "g": "g gram grams", "kg": "kg kilogram kilograms",
    "l": "l liter liters litre litres", "ml": "ml milliliter milliliters", "gal": "gal gallon gallons",
    "mph": "mph", "unit": "unit units",
}
_UNIT_OF = {w: k for k, ws in _UNIT_NAMES.items() for w in ws.split()}


def _unit_key(word: str) -> str | None:
    return _UNIT_OF.get(word.lower()) or ("" if word.lower() in _UNITS else None)


def _trailing_unit(answer: str) -> str | None:
    """The canonical unit an answer ends with ('5 \\text{ in.}' -> 'in', '12 square centimeters' -> 'cm^2',
    '12 cm^{2}' -> 'cm^2'); None when it has none or an unknown one. `unit(s)` is a wildcard ('')."""
    s = re.sub(r"\\(?:" + _TEXT_CMDS + r")\s*\{([^{}]*)\}", r" \1 ", unicode_to_latex(answer))
    s = re.sub(r"\\[,;!: ]|\$|~", " ", s).strip().rstrip(".").strip()
    if re.search(r"\d\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree)$", s):
        return "deg"
    m = re.search(r"(?:\d|\})\s*((?:square|sq\.?|cubic|cu\.?)\s+)?([A-Za-z]+\.?)\s*(?:\^\s*\{?\s*([23])\s*\}?)?$", s)
    if not m:
        return None
    unit = _UNIT_OF.get(m.group(2).lower()) or _UNIT_OF.get(m.group(2).lower().rstrip("."))
    if unit is None:
        return None
    power = m.group(3) or ("2" if (m.group(1) or "").startswith("s") else "3" if m.group(1) else "")
    return "" if unit == "unit" else unit + ("^" + power if power else "")


def _is_units(words: str) -> bool:
    ws = re.findall(r"[A-Za-z²]+", words)
    return bool(ws) and all(w.lower() in _UNITS for w in ws) and not re.search(r"[^A-Za-z²\s.^0-9/]", words)


def _words_to_number(s: str) -> str:
    """A number written in words ('one hundred twenty', 'forty-eight') is that number."""
    v = words_value(s) if re.fullmatch(r"[A-Za-z\s-]+", s) else None
    return s if v is None else str(v)


_NO_SOLUTION = re.compile(r"(?:there (?:are|is) )?(?:no(?: real)? (?:solutions?|roots?|values?|such \w+)|none|"
                          r"\\\{\s*\\\}|\{\s*\}|\\mathbb\s*\{?\s*\\?\{\}\}?)", re.I)


def _exact_forms(s: str) -> str:
    """Answer forms with one exact value: a repeating decimal (`0.\\overline{36}`, `0.666...`) is its fraction; a
    mixed number `2 1/2` is 5/2 (numerator below denominator); `\\sqrt{3} \\approx 1.732` is `\\sqrt{3}`."""
    r = repeating_decimal(s)
    if r is not None:
        return f"\\frac{{{r.p}}}{{{r.q}}}"
    m = re.fullmatch(r"(-?)\s*(\d+)\s+(\d+)\s*/\s*(\d+)", s)
    if m and 0 < int(m.group(3)) < int(m.group(4)):
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        return f"{m.group(1)}\\frac{{{whole * den + num}}}{{{den}}}"
    m = re.fullmatch(r"(.*\S)\s*(?:\\approx|≈)\s*-?\d[\d,]*\.\d+\.*", s, re.S)
    return m.group(1) if m else s


def normalize_answer(s: str) -> str:
    """Answer string -> canonical LaTeX-ish string (for cheap exact checks and the parser). `\\emptyset`,
    `\\varnothing`, `∅` and 'no (real) solution(s)/roots', 'none' are all the empty set."""
    s = _clean(s).strip()
    if len(s) > MAX_ANSWER_CHARS:  # compared as a string only; skip the regex work
        return re.sub(r"\s+", " ", s)
    s = unicode_to_latex(s)
    while True:  # unwrap \boxed{...} around the whole answer
        m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", s, re.S)
        if not m or _brace_group(s, s.index("{")) != len(s):
            break
        s = m.group(1).strip()
    s = _exact_forms(s)
    s = re.sub(r"(\d)\s*\{\s*,\s*\}\s*(?=\d)", r"\1", s)  # 14{,}916
    s = re.sub(r"(\d),\\!\s*(?=\d)", r"\1", s)  # 12,\!000
    s = re.sub(r"\\!|\\(?:displaystyle|textstyle|limits)\b|\*\*|__", "", s)
    s = re.sub(r"(\\mathbb\s*\{?R\}?|\\R(?![a-zA-Z]))\s*(?:\\(?=\s)|\\setminus|\\backslash|-)\s*", r"\\mathbb{R}\\setminus ", s)
    s = re.sub(r"\\q?quad|(?<!\\)\\[,;: ]|~", " ", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\\$|\$|\\[()\[\]]", " ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    s = re.sub(r"\\%|%|\bpercent\b|\bpct\b", "", s)
    m = _TRAILING_TEXT.search(s)
    if m and _is_units(m.group(1)) and s[: m.start()].strip():
        s = s[: m.start()]
    for _ in range(3):
        s = re.sub(r"\\(?:" + _TEXT_CMDS + r")\s*\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\\(?:emptyset|varnothing)", r"\\{\\}", s)
    s = re.sub(r"\\(?:le|leq|leqslant)(?![a-zA-Z])|<=", " ≤ ", s)
    s = re.sub(r"\\(?:ge|geq|geqslant)(?![a-zA-Z])|>=", " ≥ ", s)
    s = re.sub(r"\\(?:ne|neq)(?![a-zA-Z])|(?<![\w)}!])!=", " ≠ ", s)
    s = re.sub(r"\\pmod\s*\{[^{}]*\}|\\pmod\s*\w+|\(\s*(?:\\bmod|\\mod|mod)\s*\w+\s*\)", "", s)
    s = re.sub(r"\\lt(?![a-zA-Z])", "<", s)
    s = re.sub(r"\\gt(?![a-zA-Z])", ">", s)
    s = re.sub(r"\\in(?![a-zA-Z])", " ∈ ", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    m = re.fullmatch(r"(.*?\d[\d.}\s]*)\s*(?:\{\s*\}\s*)?\b([A-Za-z][A-Za-z.\s²/]*?)(\^\s*\{?\d\}?)?", s)
    if m and _is_units(m.group(2)):  # 64 square feet, 72 degrees
        s = m.group(1).strip()
    for word, power in _MULTIPLIERS.items():
        s = re.sub(r"(\d)\s*" + word + r"\b", r"\1\\cdot " + power, s)
    s = _words_to_number(s)
    if _NO_SOLUTION.fullmatch(s):
        s = "\\{\\}"
    m = re.fullmatch(r"\(?\s*([A-Ea-e])\s*\)?", s)  # multiple choice (C)
    if m:
        s = m.group(1).upper()
    return s.rstrip(".").strip()


def _key(s: str) -> str:
    return re.sub(r"\s+|\{\}", "", s)


def _plain_number(s: str) -> Fraction | None:
    if len(s) > 200:  # also keeps int() below Python's digit limit
        return None
    s = s.replace(" ", "") if re.fullmatch(r"-?\d{1,3}( \d{3})+(\.\d+)?", s) else s
    m = re.fullmatch(r"([-+]?)(\d{1,3}(?:,\d{3})+|\d*)(\.\d*)?(?:[eE]([-+]?\d{1,3}))?", s)
    if not m or not (m.group(2) or (m.group(3) or "")[1:]):
        return None
    value = Fraction((m.group(2) or "0").replace(",", "") + ((m.group(3) or "") if len(m.group(3) or "") > 1 else ""))
    if m.group(4):
        value *= Fraction(10) ** int(m.group(4))
    return -value if m.group(1) == "-" else value


def _close(a: complex, b: complex, tol: float = RELATIVE_TOLERANCE) -> bool:
    if a == b:
        return True
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return False
    return abs(a - b) <= tol * max(abs(a), abs(b)) or abs(a - b) <= 1e-12


@dataclass(frozen=True)
class _Ctx:
    """One comparison: its cooperative deadline and its numeric rule (see _tolerance)."""
    deadline: float
    tol: float  # relative tolerance between numbers (or expressions at sample points) that are not identical
    digits: tuple[int, int] | None = None  # a decimal prediction's (significant digits, decimal places)


_EXACT_TOLERANCE = 1e-9  # float noise of evaluating two exact expressions
_DECIMAL = re.compile(r"-?(\d*)\.(\d+)")


def _tolerance(p: str, g: str) -> _Ctx:
    """Approximation rule: numbers agree within RELATIVE_TOLERANCE only when the gold is itself written as a
    decimal. Against an exact gold (integer, fraction, surd, pi, e, log, ...) a decimal prediction must be
    exactly equal (2.5 = 5/2, 0.75 = 3/4), so `1.414` is not `\\sqrt{2}` and `7.389` is not `e^2`; the one
    exception is a rational gold with a repeating expansion written out to >= 6 significant digits, rounded or
    truncated in its last digit (`0.0833333`, `0.166667`, `0.1666666` for 1/12 and 1/6; not `0.428572` for 3/7)."""
    deadline = time.monotonic() + TIME_BUDGET_S
    if re.search(r"(?<![\d.])\d*\.\d", g):
        return _Ctx(deadline, RELATIVE_TOLERANCE)
    m = _DECIMAL.fullmatch(p.strip())
    digits = None
    if m:
        sig = len((m.group(1) + m.group(2)).lstrip("0"))
        digits = (sig, len(m.group(2)))
    return _Ctx(deadline, _EXACT_TOLERANCE, digits)


# ----------------------------------------------------------------------------------------------------
# Structures: lists/sets, tuples/intervals, unions, matrices, relations

_REL_OPS = {"=": "=", "≤": "≤", "≥": "≥", "≠": "≠", "<": "<", ">": ">", "∈": "∈", r"\approx": "=", r"\equiv": "="}
_MATRIX = re.compile(r"[(\[]?\s*\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}\s*[)\]]?", re.S)
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def _split_top(s: str, seps: tuple[str, ...]) -> list[tuple[str, str]]:
    """Split at depth 0; returns [(piece, separator_before)]."""
    out, depth, start, i, prev = [], 0, 0, 0, ""
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                word = sep.isalpha()
                if s.startswith(sep, i) and not (word and (s[i - 1: i].isalpha() or s[i + len(sep): i + len(sep) + 1].isalpha())) \
                        and not (sep == "\\cup" and s[i + 4: i + 5].isalpha()):
                    out.append((s[start:i], prev))
                    prev, i, start = sep, i + len(sep), i + len(sep)
                    break
            else:
                i += 1
                continue
            continue
        i += 1
    out.append((s[start:], prev))
    return out


def _outer_bracketed(s: str) -> bool:
    """True if s[0] opens a bracket closed exactly at s[-1]."""
    depth = 0
    for i, c in enumerate(s):
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0:
            return i == len(s) - 1
    return False


def _is_name(raw: str) -> bool:
    """A left-hand side that just names the answer: x, f(x), |AB|, a_{37}, (p,q), V_1:V_2, a+b."""
    bare = re.sub(r"_\{[^{}]*\}|_\w|\\[a-zA-Z]+", "", raw)
    return 0 < len(raw) <= 30 and not re.search(r"\d", bare) and bool(re.search(r"[A-Za-z]", raw))


def _set_builder(s: str, deadline: float):
    """Set-builder notation `\\{x \\mid x < -2 \\text{ or } x > 3\\}` is the region of its condition ('or' is a
    union, 'and' and ',' an intersection)."""
    m = re.fullmatch(r"\\?\{\s*[A-Za-z]\s*(?:∈\s*[^|:]*?)?\s*(?:\\mid|\||:)\s*(.+?)\\?\}", s, re.S)
    if not m:
        raise _Refused("bad set-builder")
    cond = m.group(1)
    ors = [p for p, _ in _split_top(cond, ("or",)) if p.strip()]
    if len(ors) > 1:
        return ("union", [_value(p, deadline) for p in ors])
    ands = [p for p, _ in _split_top(cond, ("and", ",")) if p.strip()]
    return ("inter", [_value(p, deadline) for p in ands]) if len(ands) > 1 else _value(cond, deadline)


def _side(raw: str, opaque_ok: bool, deadline: float):
    """One side of a relation; a side before the last of an `=` chain may be something the parser does not
    know (`\\angle ABC = 30`, `9 \\& 2 = \\frac{3}{4}`): it becomes an opaque name."""
    try:
        return _value(raw, deadline)
    except _Refused:
        if opaque_ok:
            return ("expr", sp.Symbol("_" + re.sub(r"\W+", "_", raw.strip())[:40]))
        raise


def _value(s: str, deadline: float):
    """Structured value of a normalised answer: a tagged tuple."""
    if time.monotonic() > deadline:
        raise _Timeout
    s = s.strip().rstrip(".").strip()
    if not s:
        raise _Refused("empty")
    if _THOUSANDS.fullmatch(s):
        return ("expr", sp.Rational(s.replace(",", "")))
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return ("matrix", [[_value(c, deadline) for c in r.split("&")] for r in rows])
    if re.match(r"\\?\{\s*[A-Za-z]\s*(?:∈\s*[^|:]*?)?\s*(?:\\mid|\||:)", s) and s.endswith("}"):
        return _set_builder(s, deadline)
    pieces = [(p.strip(), sep) for p, sep in _split_top(s, (",", ";", "and", "or")) if p.strip()]
    if len(pieces) > 1:
        if any(sep == ";" for _, sep in pieces) and any(sep == "," for _, sep in pieces):
            groups = [g for g, _ in _split_top(s, (";",)) if g.strip()]
            return ("list", [("tuple", "(", ")", [_strip_name(_value(p, deadline)) for p, _ in
                                                   _split_top(g, (","))]) for g in groups])
        return ("list", [_value(p, deadline) for p, _ in pieces])
    parts = _split_top(s, tuple(_REL_OPS))
    if len(parts) > 1:
        ops = [_REL_OPS[sep] for _, sep in parts[1:]]
        if ops == ["∈"]:
            return _value(parts[1][0], deadline)
        if "∈" in ops or any(not p.strip() for p, _ in parts):
            raise _Refused("bad relation")
        chain = all(op == "=" for op in ops)  # in a chain a = b = 5 only the last side must parse
        return ("rel", [(p.strip(), _side(p, chain and k < len(parts) - 1, deadline)) for k, (p, _) in
                        enumerate(parts)], ops)
    if re.fullmatch(r"\\mathbb\s*\{?R\}?|\\R|\\mathbb\{R\}|\(-\\infty\s*,\s*\\infty\)|all real numbers", s):
        return ("all",)
    parts = _split_top(s, ("\\setminus", "\\backslash", "\\cap"))
    if len(parts) == 2:  # set difference / intersection of regions: R \ {0} = (-oo, 0) u (0, oo)
        a, b = (_value(p, deadline) for p, _ in parts)
        return ("inter", [a, ("not", b)]) if parts[1][1] != "\\cap" else ("inter", [a, b])
    parts = _split_top(s, ("\\cup",))
    if len(parts) > 1:
        return ("union", [_value(p, deadline) for p, _ in parts])
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return ("list", [_value(p, deadline) for p, _ in _split_top(inner, (",", ";")) if p.strip()])
    if s[0] in "([{" and s[-1] in ")]}" and _outer_bracketed(s):
        items = [p for p, _ in _split_top(s[1:-1], (",", ";"))]
        if len(items) > 1:
            vals = [_value(p, deadline) for p in items]
            return ("list", vals) if s[0] == "{" else ("tuple", s[0], s[-1], vals)
    pm = _split_top(s, ("\\pm", "\\mp"))
    if len(pm) > 1:
        head, rest = pm[0][0], "".join(("\\pm" if sep else "") + p for p, sep in pm[1:])[3:]
        return ("list", [_value(f"{head}+{rest}", deadline), _value(f"{head}-{rest}", deadline)])
    if ":" in s and not re.search(r"\\[a-zA-Z]*:", s):
        parts = [p for p, _ in _split_top(s, (":",))]
        if len(parts) > 1:
            return ("ratio", [_value(p, deadline) for p in parts])
    r = repeating_decimal(s)
    return ("expr", r if r is not None else parse_math(s))


def _strip_name(v):
    if v[0] == "rel" and v[2] == ["="] and _is_name(v[1][0][0]):
        return v[1][-1][1]
    return v


# ----------------------------------------------------------------------------------------------------
# Numeric evaluation of sympy trees with Python complex numbers (bounded, no eval)

_CFUNCS = {sp.sin: cmath.sin, sp.cos: cmath.cos, sp.tan: cmath.tan, sp.asin: cmath.asin, sp.acos: cmath.acos,
           sp.atan: cmath.atan, sp.sinh: cmath.sinh, sp.cosh: cmath.cosh, sp.tanh: cmath.tanh,
           sp.exp: cmath.exp, sp.sec: lambda z: 1 / cmath.cos(z), sp.csc: lambda z: 1 / cmath.sin(z),
           sp.cot: lambda z: 1 / cmath.tan(z)}
_SAMPLE_POINTS = ((0.5477, 1.3183, 0.8762, 2.1409), (1.7321, 0.6180, 2.4495, 1.1447), (2.9137, 1.9021, 0.4142, 3.3166))


def _cnum(e, env: dict) -> complex:
    if e.is_Integer or e.is_Rational or e.is_Float:
        return complex(float(e))
    if e.is_Symbol:
        return env[e]
    if e is sp.pi:
        return complex(math.pi)
    if e is sp.E:
        return complex(math.e)
    if e is sp.I:
        return 1j
    if e is sp.oo:
        return complex(math.inf)
    if e is sp.S.NegativeInfinity:
        return complex(-math.inf)
    args = [_cnum(a, env) for a in e.args]
    if e.is_Add:
        return sum(args)
    if e.is_Mul:
        out = 1
        for a in args:
            out *= a
        return out
    if e.is_Pow:
        b, x = args
        if b == 0:
            return complex(0.0) if x.real > 0 else complex(math.inf)
        if x.imag == 0 and x.real == int(x.real) and abs(x.real) < 10**6:
            return b ** int(x.real)
        return cmath.exp(x * cmath.log(b))
    if isinstance(e, sp.Abs):
        return complex(abs(args[0]))
    if isinstance(e, sp.log):
        return cmath.log(args[0]) / (cmath.log(args[1]) if len(args) > 1 else 1)
    if isinstance(e, (sp.floor, sp.ceiling)) and args[0].imag == 0:
        return complex((math.floor if isinstance(e, sp.floor) else math.ceil)(args[0].real))
    if isinstance(e, sp.factorial) and args[0].imag == 0 and args[0].real < 170:
        return complex(math.gamma(args[0].real + 1))
    f = _CFUNCS.get(e.func)
    if f is None:
        raise _Refused(f"cannot evaluate {e.func}")
    return f(*args)


def _num(e, env: dict) -> complex | None:
    try:
        return _cnum(e, env)
    except (_Refused, OverflowError, ZeroDivisionError, ValueError, KeyError):
        return None


def _expr_equal(a, b, ctx: _Ctx) -> bool:
    if a == b:
        return True
    if a.is_Integer and b.is_Integer:  # integers are exact; the tolerance is for approximations
        return False
    if ctx.digits and a.is_Rational and b.is_Rational and ctx.digits[0] >= 6 and _repeats(b):
        unit = sp.Rational(1, 10 ** ctx.digits[1])  # rounded, or truncated towards zero, in the last place
        return bool(abs(a - b) <= unit / 2 or (a * b >= 0 and abs(a) <= abs(b) < abs(a) + unit))
    if ctx.digits and a.is_Rational and b.is_number and not b.is_Rational:
        return False  # a decimal is never an irrational gold, to any number of digits
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    if len(syms) > len(_SAMPLE_POINTS[0]) * 2:
        return False
    agree = 0
    for point in (_SAMPLE_POINTS if syms else _SAMPLE_POINTS[:1]):
        if time.monotonic() > ctx.deadline:
            raise _Timeout
        env = {s: complex(point[k % 4] + 0.1 * (k // 4)) for k, s in enumerate(syms)}
        va, vb = _num(a, env), _num(b, env)
        if va is None or vb is None:
            if va is None and vb is None and not syms:
                return _exact_zero(a - b)
            return False
        if cmath.isnan(va) and cmath.isnan(vb):
            continue
        if not _close(va, vb, ctx.tol):
            return False
        agree += 1
    return agree > 0


def _repeats(r) -> bool:
    """True if the rational r has an infinite decimal expansion (its denominator has a prime other than 2, 5)."""
    q = int(r.q)
    for f in (2, 5):
        while q % f == 0:
            q //= f
    return q != 1


def _exact_zero(d) -> bool:
    """Huge exact numbers overflow floats: compare them with sympy's own bounded arithmetic."""
    if d.has(sp.Sum, sp.Product, sp.Function):
        return False
    try:
        return bool(d == 0) or (d.is_number and abs(d.evalf(30)) < 1e-12)
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------
# Matching structured values

def _as_list(v) -> list:
    return v[1] if v[0] == "list" else [v]


def _region(v):
    """(predicate over the reals, constants, variable) for an interval/union/inequality/point set."""
    if v[0] == "tuple" and len(v[3]) == 2 and all(x[0] == "expr" and not x[1].free_symbols for x in v[3]):
        lo, hi = (_num(x[1], {}) for x in v[3])
        if lo is None or hi is None or lo.imag or hi.imag:
            return None
        lo, hi, lc, hc = lo.real, hi.real, v[1] == "[", v[2] == "]"
        return (lambda t: (lo < t or (lc and t == lo)) and (t < hi or (hc and t == hi))), [lo, hi], None
    if v[0] == "all":
        return (lambda t: True), [], None
    if v[0] == "not":
        sub = _region(v[1]) if v[1][0] != "expr" else _point_region(v[1][1])
        return None if sub is None else ((lambda t: not sub[0](t)), sub[1], sub[2])
    if v[0] == "inter":
        subs = [_region(x) if x[0] != "expr" else _point_region(x[1]) for x in v[1]]
        if any(s is None for s in subs):
            return None
        var = next((s[2] for s in subs if s[2] is not None), None)
        return (lambda t: all(s[0](t) for s in subs)), [c for s in subs for c in s[1]], var
    if v[0] in ("union", "list"):
        subs = [_region(x) if x[0] != "expr" else _point_region(x[1]) for x in v[1]]
        if not subs or any(s is None for s in subs):
            return None
        var = next((s[2] for s in subs if s[2] is not None), None)
        return (lambda t: any(s[0](t) for s in subs)), [c for s in subs for c in s[1]], var
    if v[0] == "rel" and all(op in "<>≤≥≠" for op in v[2]):
        exprs = [p[1][1] for p in v[1] if p[1][0] == "expr"]
        if len(exprs) != len(v[1]):
            return None
        syms = set().union(*(e.free_symbols for e in exprs))
        opaque = [e for e in exprs if not e.is_number]
        if len(syms) == 1 and all(_num(e, {next(iter(syms)): 1.0}) is not None for e in exprs):
            var = next(iter(syms))
        elif len(opaque) == 1:
            var = opaque[0]
        else:
            return None
        consts = [c.real for e in exprs if e.is_number for c in [_num(e, {})] if c is not None and not c.imag]

        def pred(t, exprs=exprs, ops=v[2], var=var):
            vals = [(_num(e, {var: complex(t)}) if e.free_symbols else _num(e, {})) if e != var else complex(t)
                    for e in exprs]
            if any(x is None or abs(x.imag) > 1e-12 for x in vals):
                return False
            return all(_holds(vals[k].real, op, vals[k + 1].real) for k, op in enumerate(ops))
        return pred, consts, var
    return None


def _point_region(e):
    c = _num(e, {}) if not e.free_symbols else None
    if c is None or c.imag:
        return None
    return (lambda t: abs(t - c.real) <= 1e-12 * max(1.0, abs(t))), [c.real], None


def _holds(a: float, op: str, b: float) -> bool:
    eq = abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return {"<": a < b and not eq, ">": a > b and not eq, "≤": a < b or eq, "≥": a > b or eq, "≠": not eq}[op]


def _regions_equal(p, g) -> bool | None:
    rp, rg = _region(p), _region(g)
    if rp is None or rg is None:
        return None
    if rp[2] is not None and rg[2] is not None and rp[2] != rg[2]:
        return False
    consts = sorted({c for c in rp[1] + rg[1] if math.isfinite(c)})
    points = [0.0, 1e6, -1e6] + [c + d for c in consts for d in (0, 1e-7 * max(1, abs(c)), -1e-7 * max(1, abs(c)))]
    points += [(x + y) / 2 for x, y in zip(consts, consts[1:])] + ([consts[0] - 1, consts[-1] + 1] if consts else [])
    return all(rp[0](t) == rg[0](t) for t in points)


def _match(p, g, ctx: _Ctx) -> bool:
    if time.monotonic() > ctx.deadline:
        raise _Timeout
    if {p[0], g[0]} & {"all", "not", "inter"}:
        return bool(_regions_equal(p, g))
    if {p[0], g[0]} == {"list", "union"}:  # 'x <= -2 or x >= 2' against a union of intervals
        r = _regions_equal(p, g)
        if r is not None:
            return r
    if {p[0], g[0]} == {"list", "tuple"}:
        t = _assignment_tuple(p if p[0] == "list" else g)
        if t is not None:
            return _match(t, g, ctx) if p[0] == "list" else _match(p, t, ctx)
    if p[0] == "list" or g[0] == "list":
        return _match_lists(_as_list(p), _as_list(g), ctx)
    if p[0] == "rel" or g[0] == "rel":
        return _match_rel(p, g, ctx)
    if p[0] == "union" or g[0] == "union":
        r = _regions_equal(p, g)
        return bool(r) if r is not None else (p[0] == g[0] and _match_lists(p[1], g[1], ctx))
    if p[0] != g[0]:
        return False
    if p[0] == "expr":
        return _expr_equal(p[1], g[1], ctx)
    if p[0] == "tuple":
        return (p[1], p[2]) == (g[1], g[2]) and len(p[3]) == len(g[3]) and \
            all(_match(x, y, ctx) for x, y in zip(p[3], g[3]))
    if p[0] == "ratio":
        return len(p[1]) == len(g[1]) and all(_match(x, y, ctx) for x, y in zip(p[1], g[1]))
    if p[0] == "matrix":
        return [len(r) for r in p[1]] == [len(r) for r in g[1]] and \
            all(_match(x, y, ctx) for rp, rg in zip(p[1], g[1]) for x, y in zip(rp, rg))
    return False


def _assignment_tuple(v):
    """Assignments `x = 2, y = -3` (distinct one-letter names, any order) are the tuple of their values in the
    names' alphabetical order, (2, -3); None if v is not such a list."""
    names, vals = [], []
    for item in v[1]:
        if item[0] != "rel" or item[2] != ["="] or len(item[1]) != 2:
            return None
        name = re.sub(r"[\s{}]", "", item[1][0][0])
        if not re.fullmatch(r"[A-Za-z](?:_\w+)?", name):
            return None
        names.append(name)
        vals.append(item[1][1][1])
    if len(set(names)) != len(names) or len(names) < 2:
        return None
    return ("tuple", "(", ")", [val for _, val in sorted(zip(names, vals), key=lambda nv: nv[0])])


def _match_lists(ps: list, gs: list, ctx: _Ctx) -> bool:
    """Unordered: every gold item matches a distinct prediction item (duplicates in either are merged)."""
    ps = [x for v in ps for x in _as_list(_strip_name(v))]
    gs = [x for v in gs for x in _as_list(_strip_name(v))]
    ps = [v for k, v in enumerate(ps) if v not in ps[:k]]
    gs = [v for k, v in enumerate(gs) if v not in gs[:k]]
    if len(ps) == 1 and len(gs) == 1:
        return _match(ps[0], gs[0], ctx)
    if len(ps) != len(gs):
        return False
    free = list(range(len(ps)))
    for g in gs:
        hit = next((k for k in free if _match(ps[k], g, ctx)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


def _match_rel(p, g, ctx: _Ctx) -> bool:
    if g[0] == "rel" and p[0] == "rel":
        if g[2] == ["="] * len(g[2]) and p[2] == ["="] * len(p[2]):
            gl, pl = g[1][0][0], p[1][0][0]
            if _is_name(gl) and _is_name(pl):
                return _key(gl) == _key(pl) and _match(p[1][-1][1], g[1][-1][1], ctx)
            return _equations_equal(p, g, ctx)
        r = _regions_equal(p, g)
        if r is not None:
            return r
        flip = {"<": ">", ">": "<", "≤": "≥", "≥": "≤", "≠": "≠"}
        for parts, ops in ((p[1], p[2]), (p[1][::-1], [flip.get(o, o) for o in p[2][::-1]])):
            if ops == g[2] and all(_match(x[1], y[1], ctx) for x, y in zip(parts, g[1])):
                return True
        return False
    if g[0] == "rel":
        if g[2] == ["="] * len(g[2]) and _is_name(g[1][0][0]):
            return _match(p, g[1][-1][1], ctx)
        return bool(_regions_equal(p, g))
    if p[2] == ["="] * len(p[2]):  # a prediction x = 5 + 5 = 10 answers with its last side
        return _match(p[1][-1][1], g, ctx)
    return bool(_regions_equal(p, g))


def _equations_equal(p, g, ctx: _Ctx) -> bool:
    """Equations a = b and c = d agree if a - b is a constant non-zero multiple of c - d."""
    parts = [x[1] for x in (p[1][0], p[1][-1], g[1][0], g[1][-1])]
    if any(x[0] != "expr" for x in parts):
        return False
    dp, dg = parts[0][1] - parts[1][1], parts[2][1] - parts[3][1]
    syms = sorted(dp.free_symbols | dg.free_symbols, key=str)
    ratios = []
    for point in _SAMPLE_POINTS:
        env = {s: complex(point[k % 4] + 0.1 * (k // 4)) for k, s in enumerate(syms)}
        a, b = _num(dp, env), _num(dg, env)
        if a is None or b is None:
            return dp == dg
        if abs(b) < 1e-12:
            if abs(a) > 1e-12:
                return False
            continue
        ratios.append(a / b)
    return bool(ratios) and all(abs(r) > 1e-12 and _close(r, ratios[0]) for r in ratios)


# ----------------------------------------------------------------------------------------------------
# Public API

def _equiv(pred: str, gold: str, dataset: str) -> tuple[bool, str | None]:
    """(equal, error_type if not equal). Units: when both sides state a known unit they must be the same unit
    (`5 in.` = `5\\text{ inches}`, `5 ft` != `5 inches`, `12 cm` != `12 cm^2`); a unit on one side only is
    ignored. Words: a word gold is matched by the same words without an article or a generic head noun (`an even
    function` = `even`). A prediction marked as a percentage may also be the gold as a fraction (25% = 0.25)."""
    pu, gu = _trailing_unit(pred), _trailing_unit(gold)
    if pu and gu and pu != gu:  # both state a unit: '5 ft' is not '5 inches' (units: _UNIT_NAMES)
        return False, "wrong"
    p, g = normalize_answer(pred), normalize_answer(gold)
    if re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", g) and re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", p) \
            and _word_answer(p) == _word_answer(g).lower():
        return True, None
    if _key(p) == _key(g) or (_key(p).lower() == _key(g).lower() and not re.search(r"[=<>≤≥]", p)):
        return True, None
    pn, gn = _plain_number(p), _plain_number(g)
    if pn is not None and gn is not None:
        if pn == gn or (re.search(r"\\%|%|percent", pred) and not re.search(r"%|percent", gold) and pn / 100 == gn):
            return True, None
        if re.search(r"(?<![\d.])\d*\.\d", g):  # the gold is a decimal: tolerance (see _tolerance)
            return _close(complex(pn), complex(gn)), "wrong"
        return False, "wrong"
    if max(len(p), len(g)) > MAX_ANSWER_CHARS:
        return False, "wrong"
    deadline = time.monotonic() + TIME_BUDGET_S
    try:
        ctx = _tolerance(p, g)
        return bool(_match(_value(p, deadline), _value(g, deadline), ctx)), "wrong"
    except _Timeout:
        return False, "timeout"
    except (_Refused, RecursionError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError):
        return False, "parse_error"


def _yes_no(response: str) -> tuple[str, str] | None:
    """Yes/no golds: a response (or its final sentence) that starts with the word Yes or No answers with it."""
    text = _MARKDOWN.sub("", cut_continuation(_clean(response))).strip()
    sentences = _sentences(text)
    for chunk in (text, sentences[-1] if sentences else ""):
        m = re.match(r"[\W_]*(yes|no)\b(?![\s-]+(?:one|longer|more|matter|other|such|solution|real))", chunk, re.I)
        if m:
            return m.group(1).capitalize(), "yes_no"
    return None


def _word_answer(s: str) -> str:
    """Words compared as an answer: 'an even function' -> 'even' (articles and a generic head noun dropped)."""
    s = re.sub(r"^(?:an?|the)\s+", "", s.strip().lower())
    return re.sub(r"\s+(?:function|number|integer|one|answer|case)s?$", "", s)


def is_equiv(pred: str, gold: str, dataset: str = "math") -> bool:
    """True if the extracted answer `pred` is equivalent to the bare gold answer."""
    return _equiv(pred, gold, dataset)[0]


def grade(response: str, gold: str, dataset: str, truncated: bool = False) -> Verdict:
    """Extract the answer from a full model response and compare it with the gold answer."""
    answer, how = _extract(response, dataset)
    if how not in EXPLICIT_METHODS and normalize_answer(gold).lower() in ("yes", "no"):
        answer, how = _yes_no(response) or (answer, how)
    if answer is None:
        return Verdict(False, None, how)
    if truncated and how not in EXPLICIT_METHODS:
        return Verdict(False, answer, "truncated")
    ok, err = _equiv(answer, gold, dataset)
    return Verdict(bool(ok), answer, None if ok else err)


def score_fn(prediction: str, gold: str, dataset: str) -> bool:
    """For ../shared/grader-dev/score.py."""
    return grade(prediction, gold, dataset).correct


GRADE_DATASETS = {"gsm8k": "gsm8k", "math": "math", "math500": "math"}  # row "dataset" -> grader dataset
TRUNCATED_REASONS = ("length", "max_tokens", "max_new_tokens")  # finish_reason values of a cut-off generation
FINISHED_REASONS = ("stop", "eos", "eos_token", "end_turn", "stop_sequence")


class BadRow(ValueError):
    """A predictions row that cannot be graded (its message names the file and line)."""


def _grade_row(row, where: str) -> dict:
    """One predictions row -> its verdict row; raises BadRow naming `where` (file:line) and the fix."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("id", "dataset", "response", "gold") if row.get(k) is None]
    if missing:
        raise BadRow(f"{where}: missing field(s) {', '.join(missing)}; every row needs id, dataset, response, gold "
                     "(optional finish_reason or truncated)")
    dataset = GRADE_DATASETS.get(str(row["dataset"]).lower())
    if dataset is None:
        raise BadRow(f"{where}: unknown dataset {row['dataset']!r}; expected one of {', '.join(GRADE_DATASETS)}")
    if not isinstance(row["response"], str):
        raise BadRow(f"{where}: field response must be a string, got {type(row['response']).__name__}")
    reason = row.get("finish_reason")
    if reason is not None and str(reason).lower() not in TRUNCATED_REASONS + FINISHED_REASONS:
        raise BadRow(f"{where}: unknown finish_reason {reason!r}; expected one of "
                     f"{', '.join(TRUNCATED_REASONS + FINISHED_REASONS)} (or a boolean field truncated)")
    truncated = row.get("truncated")
    if truncated is not None and not isinstance(truncated, bool):
        raise BadRow(f"{where}: field truncated must be true or false, got {truncated!r}")
    truncated = bool(truncated) or (reason is not None and str(reason).lower() in TRUNCATED_REASONS)
    v = grade(row["response"], str(row["gold"]), dataset, truncated=truncated)
    return {"id": row["id"], "correct": v.correct, "extracted": v.extracted, "error_type": v.error_type}


def grade_file(input_path: str, output_path: str, skip_bad_rows: bool = False) -> dict:
    """Re-grade a predictions JSONL (rows {"id", "dataset", "response", "gold"[, "finish_reason" | "truncated"]};
    dataset gsm8k, math or math500; finish_reason "length" or truncated true marks a generation cut off at its
    token limit, whose unmarked answer is not credited) into verdict rows {"id", "correct", "extracted",
    "error_type"}. A bad row (not JSON, a missing field, an unknown dataset) raises BadRow naming the file and
    line, or with skip_bad_rows is skipped and counted. The output is written to a temporary file beside it and
    renamed into place at the end, so a failed run leaves an existing output untouched; an output path that is
    the input is refused. Returns {"n", "correct", "accuracy", "skipped"}."""
    src, dst = Path(input_path), Path(output_path)
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise BadRow(f"--output {output_path} is the input file; write the verdicts to another path")
    n = correct = skipped = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "w", encoding="utf-8") as fout:
            for lineno, raw in enumerate(fin, 1):
                where = f"{input_path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRow(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                     "each line must be one JSON object") from None
                    out = _grade_row(row, where)
                except UnicodeDecodeError:
                    if not skip_bad_rows:
                        raise BadRow(f"{where}: not UTF-8 text; re-save the file as UTF-8") from None
                    skipped += 1
                    continue
                except BadRow:
                    if not skip_bad_rows:
                        raise
                    skipped += 1
                    continue
                fout.write(json.dumps(out, ensure_ascii=False) + "\n")
                n += 1
                correct += out["correct"]
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "skipped": skipped}
