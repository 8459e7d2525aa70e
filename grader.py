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
Plain numbers compare exactly unless the gold is itself a decimal (equivalence.comparison_context: a decimal
approximation of an exact gold such as `1.414` for `\\sqrt{2}` is wrong). Otherwise both sides become
structured values (equivalence.py: expressions built by the small recursive-descent parser of mathparse.py,
lists/sets, tuples/intervals, unions, set-builder and set-difference regions, matrices, relations,
assignments) and are matched there.

Safety: model output is untrusted. Nothing here (or in equivalence.py and mathparse.py) calls eval, sympify,
parse_expr or simplify. Every operation is bounded up front instead of timed out from outside (which would
need the main thread or a process pool): the response is cut to its last MAX_RESPONSE_CHARS characters, an
answer longer than MAX_ANSWER_CHARS is compared as a string only, the parser refuses nesting deeper than
MAX_DEPTH, exact powers whose result would exceed MAX_POW_BITS bits and factorials/binomials above
MAX_FACTORIAL, and the numeric checks use plain Python floats (mpmath-free). A cooperative deadline
(equivalence.TIME_BUDGET_S) is checked between steps as a last guard; exceeding it gives error_type
"timeout". So grade() is safe in any thread and never hangs the evaluation process.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from equivalence import RELATIVE_TOLERANCE as RELATIVE_TOLERANCE  # re-exported: part of grader's API
from equivalence import (
    Timeout,
    answer_key,
    comparison_context,
    match_values,
    numbers_close,
    parse_value,
)
from mathparse import (
    MAX_ANSWER_CHARS,
    repeating_decimal,
    unicode_to_latex,
    words_to_digits,
    words_value,
)
from mathparse import Refused as _Refused

MAX_RESPONSE_CHARS = 64_000  # only the tail of a longer response is searched for the answer
EXPLICIT_METHODS = ("boxed", "answer_is", "hashes", "answer_line")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    error_type: str | None  # None when correct; else no_answer, truncated, parse_error, timeout, wrong


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
            elif w in _MULTIPLIERS and prev == "num":
                pass  # '1.2 thousand'
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
    if gsm and _plain_number(ans) is None and not re.search(r"\d\s*(?:thousand|million|billion)\b", ans):  # "18 apples", "$18", "25 m^{2}": keep the number
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
    m = re.search(r"\s+of\s+(?:an?|the)\s+([A-Za-z]+)\.?$", s)
    if m and _unit_key(m.group(1)) is not None:  # '3/4 of an hour'
        s = s[: m.start()]
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
    pk, gk = answer_key(p), answer_key(g)
    if pk == gk or (pk.lower() == gk.lower() and not re.search(r"[=<>≤≥]", p)):
        return True, None
    pn, gn = _plain_number(p), _plain_number(g)
    if pn is not None and gn is not None:
        if pn == gn or (re.search(r"\\%|%|percent", pred) and not re.search(r"%|percent", gold) and pn / 100 == gn):
            return True, None
        if re.search(r"(?<![\d.])\d*\.\d", g):  # the gold is a decimal: tolerance (see comparison_context)
            return numbers_close(complex(pn), complex(gn)), "wrong"
        return False, "wrong"
    if max(len(p), len(g)) > MAX_ANSWER_CHARS:
        return False, "wrong"
    ctx = comparison_context(p, g)
    try:
        return bool(match_values(parse_value(p, ctx.deadline), parse_value(g, ctx.deadline), ctx)), "wrong"
    except Timeout:
        return False, "timeout"
    except (_Refused, RecursionError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError):
        return False, "parse_error"


def _yes_no(response: str) -> tuple[str, str] | None:
    """Yes/no golds: a final sentence, else a response, that starts with the word Yes or No answers with it."""
    text = _MARKDOWN.sub("", cut_continuation(_clean(response))).strip()
    sentences = _sentences(text)
    for chunk in (sentences[-1] if sentences else "", text):
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
