"""Structured answer values and their equivalence (grader.py's comparison half).

    from equivalence import parse_value, match_values, comparison_context
    match_values(parse_value(pred, deadline), parse_value(gold, deadline), comparison_context(pred, gold))

A normalised answer string becomes a tagged value: an expression (a sympy object built by mathparse, never by
eval/sympify), a list/set, a tuple or interval, a union, a set-builder/set-difference region, a matrix, a
ratio or a relation. Expressions are equal if sympy's canonical forms agree, or if they agree numerically at
three fixed points for their free symbols (a Schwartz-Zippel style identity test) within the comparison's
tolerance (see comparison_context); relations, intervals and sets of reals are compared as regions of the
real line at all their endpoints, just beside them and between them. Every step checks the comparison's
cooperative deadline and raises Timeout past it.
"""
from __future__ import annotations

import cmath
import math
import re
import time
from dataclasses import dataclass

import sympy as sp

from mathparse import Refused as _Refused
from mathparse import parse_math, repeating_decimal

RELATIVE_TOLERANCE = 1e-4  # numbers (and expressions at sample points) agree within this relative error
MIN_REPEATING_DIGITS = 8  # a decimal this long may stand for a repeating rational gold (see comparison_context)
TIME_BUDGET_S = 2.0  # cooperative deadline per comparison


class Timeout(Exception):
    """A comparison ran past its deadline."""


def answer_key(s: str) -> str:
    return re.sub(r"\s+|\{\}", "", s)


def numbers_close(a: complex, b: complex, tol: float = RELATIVE_TOLERANCE) -> bool:
    if a == b:
        return True
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return False
    return abs(a - b) <= tol * max(abs(a), abs(b)) or abs(a - b) <= 1e-12


@dataclass(frozen=True)
class Comparison:
    """One comparison: its cooperative deadline and its numeric rule (see comparison_context)."""
    deadline: float
    tol: float  # relative tolerance between numbers (or expressions at sample points) that are not identical
    digits: tuple[int, int] | None = None  # a decimal prediction's (significant digits, decimal places)


_EXACT_TOLERANCE = 1e-9  # float noise of evaluating two exact expressions
_DECIMAL = re.compile(r"-?(\d*)\.(\d+)")


def comparison_context(p: str, g: str) -> Comparison:
    """Approximation rule: numbers agree within RELATIVE_TOLERANCE only when the gold is itself written as a
    decimal. Against an exact gold (integer, fraction, surd, pi, e, log, ...) a decimal prediction must be
    exactly equal (2.5 = 5/2, 0.75 = 3/4), so `1.414` is not `\\sqrt{2}` and `7.389` is not `e^2`; the one
    exception is a rational gold with a repeating expansion written out to >= 8 significant digits (a float
    printout), rounded or truncated in its last digit (`0.0833333333`, `0.16666667` for 1/12 and 1/6; not
    `0.42857143` for 3/7, and not `0.166667`: six digits are an approximation)."""
    deadline = time.monotonic() + TIME_BUDGET_S
    if re.search(r"(?<![\d.])\d*\.\d", g):
        return Comparison(deadline, RELATIVE_TOLERANCE)
    m = _DECIMAL.fullmatch(p.strip())
    digits = None
    if m:
        sig = len((m.group(1) + m.group(2)).lstrip("0"))
        digits = (sig, len(m.group(2)))
    return Comparison(deadline, _EXACT_TOLERANCE, digits)


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
        return ("union", [parse_value(p, deadline) for p in ors])
    ands = [p for p, _ in _split_top(cond, ("and", ",")) if p.strip()]
    return ("inter", [parse_value(p, deadline) for p in ands]) if len(ands) > 1 else parse_value(cond, deadline)


def _side(raw: str, opaque_ok: bool, deadline: float):
    """One side of a relation; a side before the last of an `=` chain may be something the parser does not
    know (`\\angle ABC = 30`, `9 \\& 2 = \\frac{3}{4}`): it becomes an opaque name."""
    try:
        return parse_value(raw, deadline)
    except _Refused:
        if opaque_ok:
            return ("expr", sp.Symbol("_" + re.sub(r"\W+", "_", raw.strip())[:40]))
        raise


def parse_value(s: str, deadline: float):
    """Structured value of a normalised answer: a tagged tuple."""
    if time.monotonic() > deadline:
        raise Timeout
    s = s.strip().rstrip(".").strip()
    if not s:
        raise _Refused("empty")
    if _THOUSANDS.fullmatch(s):
        return ("expr", sp.Rational(s.replace(",", "")))
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return ("matrix", [[parse_value(c, deadline) for c in r.split("&")] for r in rows])
    if re.match(r"\\?\{\s*[A-Za-z]\s*(?:∈\s*[^|:]*?)?\s*(?:\\mid|\||:)", s) and s.endswith("}"):
        return _set_builder(s, deadline)
    pieces = [(p.strip(), sep) for p, sep in _split_top(s, (",", ";", "and", "or")) if p.strip()]
    if len(pieces) > 1:
        if any(sep == ";" for _, sep in pieces) and any(sep == "," for _, sep in pieces):
            groups = [g for g, _ in _split_top(s, (";",)) if g.strip()]
            return ("list", [("tuple", "(", ")", [_strip_name(parse_value(p, deadline)) for p, _ in
                                                   _split_top(g, (","))]) for g in groups])
        return ("list", [parse_value(p, deadline) for p, _ in pieces])
    parts = _split_top(s, tuple(_REL_OPS))
    if len(parts) > 1:
        ops = [_REL_OPS[sep] for _, sep in parts[1:]]
        if ops == ["∈"]:
            return parse_value(parts[1][0], deadline)
        if "∈" in ops or any(not p.strip() for p, _ in parts):
            raise _Refused("bad relation")
        chain = all(op == "=" for op in ops)  # in a chain a = b = 5 only the last side must parse
        return ("rel", [(p.strip(), _side(p, chain and k < len(parts) - 1, deadline)) for k, (p, _) in
                        enumerate(parts)], ops)
    if re.fullmatch(r"\\mathbb\s*\{?R\}?|\\R|\\mathbb\{R\}|\(-\\infty\s*,\s*\\infty\)|all real numbers", s):
        return ("all",)
    parts = _split_top(s, ("\\setminus", "\\backslash", "\\cap"))
    if len(parts) == 2:  # set difference / intersection of regions: R \ {0} = (-oo, 0) u (0, oo)
        a, b = (parse_value(p, deadline) for p, _ in parts)
        return ("inter", [a, ("not", b)]) if parts[1][1] != "\\cap" else ("inter", [a, b])
    parts = _split_top(s, ("\\cup",))
    if len(parts) > 1:
        return ("union", [parse_value(p, deadline) for p, _ in parts])
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return ("list", [parse_value(p, deadline) for p, _ in _split_top(inner, (",", ";")) if p.strip()])
    if s[0] in "([{" and s[-1] in ")]}" and _outer_bracketed(s):
        items = [p for p, _ in _split_top(s[1:-1], (",", ";"))]
        if len(items) > 1:
            vals = [parse_value(p, deadline) for p in items]
            return ("list", vals) if s[0] == "{" else ("tuple", s[0], s[-1], vals)
    pm = _split_top(s, ("\\pm", "\\mp"))
    if len(pm) > 1:
        head, rest = pm[0][0], "".join(("\\pm" if sep else "") + p for p, sep in pm[1:])[3:]
        return ("list", [parse_value(f"{head}+{rest}", deadline), parse_value(f"{head}-{rest}", deadline)])
    if ":" in s and not re.search(r"\\[a-zA-Z]*:", s):
        parts = [p for p, _ in _split_top(s, (":",))]
        if len(parts) > 1:
            return ("ratio", [parse_value(p, deadline) for p in parts])
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


def _expr_equal(a, b, ctx: Comparison) -> bool:
    if a == b:
        return True
    if a.is_Integer and b.is_Integer:  # integers are exact; the tolerance is for approximations
        return False
    if ctx.digits and a.is_Rational and b.is_Rational and ctx.digits[0] >= MIN_REPEATING_DIGITS and _repeats(b):
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
            raise Timeout
        env = {s: complex(point[k % 4] + 0.1 * (k // 4)) for k, s in enumerate(syms)}
        va, vb = _num(a, env), _num(b, env)
        if va is None or vb is None:
            if va is None and vb is None and not syms:
                return _exact_zero(a - b)
            return False
        if cmath.isnan(va) and cmath.isnan(vb):
            continue
        if not numbers_close(va, vb, ctx.tol):
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


def match_values(p, g, ctx: Comparison) -> bool:
    if time.monotonic() > ctx.deadline:
        raise Timeout
    if {p[0], g[0]} & {"all", "not", "inter"}:
        return bool(_regions_equal(p, g))
    if {p[0], g[0]} == {"list", "union"}:  # 'x <= -2 or x >= 2' against a union of intervals
        r = _regions_equal(p, g)
        if r is not None:
            return r
    if {p[0], g[0]} == {"list", "tuple"}:
        t = _assignment_tuple(p if p[0] == "list" else g)
        if t is not None:
            return match_values(t, g, ctx) if p[0] == "list" else match_values(p, t, ctx)
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
            all(match_values(x, y, ctx) for x, y in zip(p[3], g[3]))
    if p[0] == "ratio":
        return len(p[1]) == len(g[1]) and all(match_values(x, y, ctx) for x, y in zip(p[1], g[1]))
    if p[0] == "matrix":
        return [len(r) for r in p[1]] == [len(r) for r in g[1]] and \
            all(match_values(x, y, ctx) for rp, rg in zip(p[1], g[1]) for x, y in zip(rp, rg))
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


def _match_lists(ps: list, gs: list, ctx: Comparison) -> bool:
    """Unordered: every gold item matches a distinct prediction item (duplicates in either are merged)."""
    ps = [x for v in ps for x in _as_list(_strip_name(v))]
    gs = [x for v in gs for x in _as_list(_strip_name(v))]
    ps = [v for k, v in enumerate(ps) if v not in ps[:k]]
    gs = [v for k, v in enumerate(gs) if v not in gs[:k]]
    if len(ps) == 1 and len(gs) == 1:
        return match_values(ps[0], gs[0], ctx)
    if len(ps) != len(gs):
        return False
    free = list(range(len(ps)))
    for g in gs:
        hit = next((k for k in free if match_values(ps[k], g, ctx)), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


def _match_rel(p, g, ctx: Comparison) -> bool:
    if g[0] == "rel" and p[0] == "rel":
        if g[2] == ["="] * len(g[2]) and p[2] == ["="] * len(p[2]):
            gl, pl = g[1][0][0], p[1][0][0]
            if _is_name(gl) and _is_name(pl):
                return answer_key(gl) == answer_key(pl) and match_values(p[1][-1][1], g[1][-1][1], ctx)
            return _equations_equal(p, g, ctx)
        r = _regions_equal(p, g)
        if r is not None:
            return r
        flip = {"<": ">", ">": "<", "≤": "≥", "≥": "≤", "≠": "≠"}
        for parts, ops in ((p[1], p[2]), (p[1][::-1], [flip.get(o, o) for o in p[2][::-1]])):
            if ops == g[2] and all(match_values(x[1], y[1], ctx) for x, y in zip(parts, g[1])):
                return True
        return False
    if g[0] == "rel":
        if g[2] == ["="] * len(g[2]) and _is_name(g[1][0][0]):
            return match_values(p, g[1][-1][1], ctx)
        return bool(_regions_equal(p, g))
    if p[2] == ["="] * len(p[2]):  # a prediction x = 5 + 5 = 10 answers with its last side
        return match_values(p[1][-1][1], g, ctx)
    return bool(_regions_equal(p, g))


def _equations_equal(p, g, ctx: Comparison) -> bool:
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
    return bool(ratios) and all(abs(r) > 1e-12 and numbers_close(r, ratios[0]) for r in ratios)
