"""A small recursive-descent LaTeX / plain-math parser that builds sympy objects (grader.py's parser).
Model output is untrusted: nothing here calls eval, sympify or parse_expr, and every
operation is bounded up front (input length, nesting depth, exact power size, factorial size); a refused
input raises Refused.

    from mathparse import parse_math, Refused
    parse_math(r"\frac{1}{2}\\sqrt{3}")  # -> sqrt(3)/2
"""
from __future__ import annotations

import re

import sympy as sp

MAX_ANSWER_CHARS = 1_000  # longer answers are never parsed (grader compares them as normalised strings)
MAX_DEPTH = 60  # parser nesting limit (brackets, fractions, unary signs)
MAX_POW_BITS = 20_000  # exact powers with a larger result are refused
MAX_FACTORIAL = 1_000  # n! and binom(n, k) are refused above this n


class Refused(Exception):
    """The input is outside what the parser accepts (too long, too deep, too large, or not math)."""


# ----------------------------------------------------------------------------------------------------
# Parser: LaTeX / plain math -> sympy (no eval, no sympify)

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+(?![\d.]))?|\.\d+)|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
                    r"|(?P<op>[-+*/^_()\[\]{}|!,=<>:'≤≥≠∈])|(?P<sym>[a-zA-Z]))")
_FUNCS = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "sec": sp.sec, "csc": sp.csc, "cot": sp.cot,
          "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "sinh": sp.sinh, "cosh": sp.cosh,
          "tanh": sp.tanh, "ln": sp.log, "log": sp.log, "exp": sp.exp}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
             "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split())
_ATOM_CMDS = {"frac", "sqrt", "pi", "infty", "binom", "lfloor", "lceil", "sum", "prod", "mathrm", *_FUNCS, *_GREEK}


def _tokenize(s: str) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if not m or m.end() == i:
            if s[i:].strip() == "":
                break
            raise Refused(f"unexpected character {s[i]!r}")
        i = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    return out


def _pow(base, exp):
    if exp.is_Number and abs(exp) > 10**6:
        raise Refused("exponent too large")
    if base.is_Rational and exp.is_Rational and base not in (0, 1, -1):
        bits = max(abs(base.p), abs(base.q)).bit_length()
        if abs(exp) * bits > MAX_POW_BITS:
            raise Refused("power too large")
    return sp.Pow(base, exp)


def _factorial(n):
    if n.is_Number and (not n.is_Integer or n < 0 or n > MAX_FACTORIAL):
        raise Refused("factorial out of range")
    return sp.factorial(n)


class _Parser:
    """Recursive descent over tokens: expr := term (+|- term)*, term := unary ((*|/|implicit) unary)*,
    unary := (-|+) unary | power, power := postfix (^ arg)?, postfix := atom !*."""

    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i, self.depth, self.in_abs = 0, 0, 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "")

    def accept(self, val: str) -> bool:
        if self.peek()[1] == val:
            self.i += 1
            return True
        return False

    def expect(self, val: str) -> None:
        if not self.accept(val):
            raise Refused(f"expected {val!r} at token {self.i}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Refused("nesting too deep")

    def parse(self):
        e = self.expr()
        if self.peek()[0] != "end":
            raise Refused(f"unexpected {self.peek()[1]!r}")
        return e

    def expr(self):
        self.enter()
        terms = [self.term()]  # sympy Add/Mul built once: folding one by one is quadratic
        while self.peek()[1] in ("+", "-"):
            op = self.toks[self.i][1]
            self.i += 1
            terms.append(self.term() if op == "+" else -self.term())
        self.depth -= 1
        return sp.Add(*terms)

    def starts_atom(self, t: tuple[str, str]) -> bool:
        kind, val = t
        if kind in ("num", "sym"):
            return True
        if val in ("(", "{") or (val == "|" and not self.in_abs):
            return True
        return kind == "cmd" and val[1:] in _ATOM_CMDS

    def term(self):
        factors = [self.unary()]
        while True:
            val = self.peek()[1]
            if val in ("*", r"\cdot", r"\times"):
                self.i += 1
                factors.append(self.unary())
            elif val in ("/", r"\div"):
                self.i += 1
                factors = [sp.Mul(*factors) / self.unary()]
            elif self.starts_atom(self.peek()):
                factors.append(self.power())
            else:
                return sp.Mul(*factors)

    def unary(self):
        self.enter()
        if self.accept("-"):
            node = -self.unary()
        elif self.accept("+"):
            node = self.unary()
        else:
            node = self.power()
        self.depth -= 1
        return node

    def power(self):
        base = self.atom()
        while self.accept("!"):
            base = _factorial(base)
        if self.accept("^"):
            if self.accept("-"):
                return _pow(base, -self.arg())
            return _pow(base, self.arg())
        return base

    def arg(self):
        """A LaTeX macro argument: {group}, or a single digit/letter/command."""
        kind, val = self.peek()
        if val == "{":
            self.i += 1
            e = self.expr()
            self.expect("}")
            return e
        if kind == "num":
            if len(val) > 1:  # \frac12: one character per argument
                self.toks[self.i] = ("num", val[1:])
                return sp.Integer(int(val[0])) if val[0].isdigit() else self._bad()
            self.i += 1
            return sp.Rational(val)
        if kind in ("sym", "cmd") or val in ("(", "|"):
            return self.atom()
        return self._bad()

    def _bad(self):
        raise Refused(f"unexpected {self.peek()[1]!r}")

    def subscript_name(self) -> str:
        kind, val = self.peek()
        if val == "{":
            j = self.i + 1
            while j < len(self.toks) and self.toks[j][1] != "}":
                j += 1
            inner = self.toks[self.i + 1: j]
            if all(k in ("num", "sym") for k, _ in inner) and inner:
                self.i = j + 1
                return "".join(v for _, v in inner)
            return ""
        if kind in ("num", "sym"):
            self.i += 1
            return val
        return ""

    def atom(self):
        self.enter()
        node = self._atom()
        self.depth -= 1
        return node

    def _atom(self):
        kind, val = self.peek()
        self.i += 1
        if kind == "num":
            if self.peek()[1] == "_":  # base-n literal such as 204_5: an opaque token
                self.i += 1
                return sp.Symbol(f"{val}_{self.subscript_name() or self._bad()}")
            if "." not in val and self.peek()[1] == r"\frac":  # mixed number 2\frac{1}{2}
                save = self.i
                self.i += 1
                num, den = self.arg(), self.arg()
                if num.is_Integer and den.is_Integer and den != 0 and self.toks[save + 1][0] in ("op", "num"):
                    return sp.Integer(int(val)) + num / den
                self.i = save
            return sp.Rational(val)
        if kind == "sym":
            return self._symbol(val)
        if val in ("(", "["):
            e = self.expr()
            if not self.accept(")"):
                self.expect("]")
            return e
        if val == "{":
            e = self.expr()
            self.expect("}")
            return e
        if val == "|":
            self.in_abs += 1
            e = self.expr()
            self.in_abs -= 1
            self.expect("|")
            return sp.Abs(e)
        if kind == "cmd":
            return self._command(val[1:])
        self.i -= 1
        return self._bad()

    def _symbol(self, name: str):
        if self.accept("_"):
            sub = self.subscript_name()
            if sub:
                return sp.Symbol(f"{name}_{sub}")
            return sp.Function(name)(self.arg())
        if name in "fgh" and self.peek()[1] == "(":
            self.i += 1
            args = [self.expr()]
            while self.accept(","):
                args.append(self.expr())
            self.expect(")")
            return sp.Function(name)(*args)
        return {"i": sp.I, "e": sp.E}.get(name) or sp.Symbol(name)

    def _command(self, name: str):
        if name == "frac":
            num = self.arg()
            return num / self.arg()
        if name == "sqrt":
            if self.accept("["):
                n = self.expr()
                self.expect("]")
                if not n.is_Integer or not 1 <= n <= 1000:
                    raise Refused("bad root index")
                return sp.root(self.arg(), n)
            return sp.sqrt(self.arg())
        if name == "pi":
            return sp.pi
        if name == "infty":
            return sp.oo
        if name == "binom":
            n, k = self.arg(), self.arg()
            if n.is_Number and (not n.is_Integer or abs(n) > MAX_FACTORIAL):
                raise Refused("binomial out of range")
            return sp.binomial(n, k)
        if name in ("lfloor", "lceil"):
            e = self.expr()
            self.expect("\\r" + name[1:])
            return sp.floor(e) if name == "lfloor" else sp.ceiling(e)
        if name in _GREEK:
            return sp.Symbol(name)
        if name in _FUNCS:
            return self._function(name)
        if name in ("sum", "prod"):
            return self._big_operator(name)
        self.i -= 1
        return self._bad()

    def _function(self, name: str):
        base = None
        if name == "log" and self.accept("_"):
            base = self.arg()
        power = self.arg() if self.accept("^") else None
        if self.peek()[1] == "(":
            self.i += 1
            a = self.expr()
            self.expect(")")
        else:  # \sin 2x: the following product, up to the next function or operator
            a = self.power()
            while self.starts_atom(self.peek()) and self.peek()[1][1:] not in _FUNCS:
                a = a * self.power()
        f = _FUNCS[name](a) if base is None else sp.log(a, base)
        return f if power is None else _pow(f, power)

    def _big_operator(self, name: str):
        self.expect("_")
        self.expect("{")
        var = self._symbol(self.peek()[1]) if self.peek()[0] == "sym" else self._bad()
        self.i += 1 if isinstance(var, sp.Symbol) and self.peek()[1] == var.name else 0
        self.expect("=")
        lo = self.expr()
        self.expect("}")
        self.expect("^")
        hi = self.arg()
        body = self.power()
        while self.starts_atom(self.peek()):
            body = body * self.power()
        op = sp.Sum if name == "sum" else sp.Product
        return op(body, (var, lo, hi))


def parse_math(s: str):
    """A normalised answer string -> sympy expression (raises Refused)."""
    if len(s) > MAX_ANSWER_CHARS:
        raise Refused("answer too long")
    return _Parser(s).parse()


# ----------------------------------------------------------------------------------------------------
# Plain-text mathematics: unicode symbols, numbers in words, repeating decimals

_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_VULGAR = {"½": (1, 2), "⅓": (1, 3), "⅔": (2, 3), "¼": (1, 4), "¾": (3, 4), "⅕": (1, 5), "⅖": (2, 5),
           "⅗": (3, 5), "⅘": (4, 5), "⅙": (1, 6), "⅚": (5, 6), "⅛": (1, 8), "⅜": (3, 8), "⅝": (5, 8), "⅞": (7, 8)}
_UNICODE_MATH = {"−": "-", "–": "-", "×": r"\times ", "÷": r"\div ", "·": r"\cdot ", "⋅": r"\cdot ",
                 "π": r"\pi ", "∞": r"\infty ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "∈": r"\in ",
                 "∪": r"\cup ", "∩": r"\cap ", "∅": r"\emptyset ", "ℝ": r"\mathbb{R}", "∖": r"\setminus ",
                 "≈": r"\approx ", "°": r"^\circ ", "€": "", "£": "", "¥": "", "\u2009": " ", "\u202f": " ",
                 "\u00a0": " ", "±": r"\pm ", "θ": r"\theta ", "α": r"\alpha ", "β": r"\beta "}


_ASCII_MATH = re.compile(r"(?<![\\A-Za-z])(sqrt|pi|infinity|infty|inf|ln|log|sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan"
                         r"|theta)(?![A-Za-z])(?=\s*[\d({\s^/*)+.,-]|$)")


def unicode_to_latex(s: str) -> str:
    """Plain-text/unicode maths to LaTeX: `2π` -> `2\\pi`, `x²` -> `x^{2}`, `√2/2` -> `\\sqrt{2}/2`, `0.3̅` -> `0.\\overline{3}`,
    `3√5` -> `3\\sqrt{5}`, `4½` -> `4\\frac{1}{2}`, `−` (U+2212) -> `-`, `(−∞, 1)` -> `(-\\infty, 1)`; ASCII
    function and constant names before maths become commands: `sqrt(2)/2`, `2*pi`, `ln(2)`, `(-infinity, 1)`."""
    s = _ASCII_MATH.sub(lambda m: "\\infty" if m.group(1).lower().startswith("inf") else "\\" + m.group(1), s)
    if s.isascii():
        return s
    s = re.sub(r"((?:\d\u0305)+)", lambda m: r"\overline{" + m.group(1).replace("\u0305", "") + "}", s)  # 0.3̅
    s = re.sub(r"([⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)", lambda m: "^{" + m.group(1).translate(_SUPERSCRIPTS) + "}", s)
    s = re.sub(r"(\d?)\s*([" + "".join(_VULGAR) + "])",
               lambda m: m.group(1) + r"\frac{{{}}}{{{}}}".format(*_VULGAR[m.group(2)]), s)
    s = re.sub(r"([∛∜√])\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\)|\{[^{}]*\})",
               lambda m: {"√": r"\sqrt", "∛": r"\sqrt[3]", "∜": r"\sqrt[4]"}[m.group(1)]
               + "{" + m.group(2).strip("(){}") + "}", s)
    s = s.replace("√", r"\sqrt ")
    for k, v in _UNICODE_MATH.items():
        s = s.replace(k, v)
    return s


_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUM_WORD = r"(?:" + "|".join(sorted([*_SMALL, *_TENS, "hundred", *_SCALES], key=len, reverse=True)) + r")"
_NUM_PHRASE = re.compile(r"(?<![\w-])(?:a\s+(?=(?:hundred|thousand|million|billion)\b))?" + _NUM_WORD
                         + r"(?:(?:[\s-]+|\s+and\s+)" + _NUM_WORD + r")*(?![\w-])", re.I)


def words_value(phrase: str) -> int | None:
    """'one hundred twenty' -> 120, 'forty-eight' -> 48, 'two thousand and five' -> 2005; None if the words
    do not form one number ('one two', 'hundred five' are not numbers)."""
    total, current, last = 0, 0, None
    words = re.split(r"[\s-]+", phrase.lower().strip())
    if words[0] == "a" and (len(words) < 2 or words[1] not in ("hundred", *_SCALES)):
        return None
    for w in words:
        if w == "and":
            continue
        if w == "a" and last is None:  # 'a hundred'
            current, last = 1, "small"
            continue
        if w in _SMALL:
            if last in ("small", "teen"):
                return None
            if last == "tens" and (_SMALL[w] == 0 or _SMALL[w] >= 10):
                return None
            current += _SMALL[w]
            last = "teen" if _SMALL[w] >= 10 else "small"
        elif w in _TENS:
            if last in ("small", "teen", "tens"):
                return None
            current += _TENS[w]
            last = "tens"
        elif w == "hundred":
            if last not in ("small", "teen") or current >= 100:
                return None
            current *= 100
            last = "hundred"
        elif w in _SCALES:
            if last is None or last == "scale" or current == 0:
                return None
            total += current * _SCALES[w]
            current, last = 0, "scale"
        else:
            return None
    return total + current if last is not None else None


def words_to_digits(text: str) -> str:
    """Numbers written in words inside prose become digits ('twelve toys' -> '12 toys'); 'one' is kept where it
    is a pronoun ('no one', 'one of', 'one-to-one')."""
    def repl(m: re.Match) -> str:
        phrase = m.group(0)
        before, after = text[max(0, m.start() - 6): m.start()].lower(), text[m.end(): m.end() + 4].lower()
        if phrase.lower() == "one" and (re.search(r"(no|each|any|every|some|which|this|that|the)\s+$", before)
                                        or after.startswith((" of", "-to", " to one", " another"))):
            return phrase
        value = words_value(phrase)
        return phrase if value is None else str(value)
    return _NUM_PHRASE.sub(repl, text)


def repeating_decimal(s: str):
    """`0.\\overline{36}`, `0.1\\overline{6}`, `0.(3)`, `0.3636...`, `0.666\\ldots` -> the exact sympy Rational;
    None if s is not written as a repeating decimal (a trailing ellipsis needs a period seen at least twice,
    or one digit three times)."""
    if len(s) > 200:
        return None
    m = re.fullmatch(r"(-?)(\d*)\.(\d*)(?:\\overline\s*\{(\d+)\}|\\overline\s*(\d)|\((\d+)\))", s.strip())
    if m:
        sign, whole, pre, period = m.group(1), m.group(2) or "0", m.group(3), m.group(4) or m.group(5) or m.group(6)
    else:
        m = re.fullmatch(r"(-?)(\d*)\.(\d+)\s*(?:\.\.\.|\\ldots|\\cdots|\\dots|…)", s.strip())
        if not m:
            return None
        sign, whole, digits = m.group(1), m.group(2) or "0", m.group(3)
        best = None
        for start in range(len(digits)):
            for size in range(1, 7):
                tail = digits[start:]
                reps = len(tail) / size
                if reps >= (3 if size == 1 else 2) and tail == (tail[:size] * (len(tail) // size + 1))[:len(tail)]:
                    best = (start, size)
                    break
            if best:
                break
        if not best:
            return None
        pre, period = digits[:best[0]], digits[best[0]: best[0] + best[1]]
    value = sp.Integer(int(whole)) + (sp.Rational(int(pre), 10 ** len(pre)) if pre else 0) \
        + sp.Rational(int(period), 10 ** len(pre) * (10 ** len(period) - 1))
    return -value if sign else value
