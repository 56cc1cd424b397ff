"""A careful grader's reading of a final answer, in front of math-verify (used by ``rewards.score_pair``).

math-verify compares two parsed values; this module decides *what* the values are and whether the answer
is in the form the problem demands, by general rules (never by specific strings):

* ``clean``: one answer string to plain LaTeX plus what was stripped from it (units, a degree sign,
  currency). Handles ``$``/``\\(``, ``\\text``-like wrappers, ``\\dfrac``, ``\\sqrt3``, ``\\frac43``, thousands
  separators (``{,}``, ``\\,``, ``,\\!``, thin spaces), Unicode minus/degree/pi/relations, trailing periods,
  number words (``four``), magnitude words (``1.45 million``), e-notation, repeating decimals, base
  subscripts (``52_8``), mixed numbers (``1 \\frac{4}{5}`` is 9/5, never 4/5).
* ``structure``: the answer as a tree: a scalar, a text, a choice letter, a bracketed sequence (tuple,
  interval, vector), an unordered list/set, a union of intervals; inequalities become intervals, ``\\pm``
  expands, named components (``a=-2, b=1``) are ordered by the problem's tuple template.
* ``Form`` / ``infer_form``: what the problem demands (a common fraction, a decimal, simplest radical form,
  a factored or expanded form, a mixed number, interval notation, units) and ``form_ok`` applies it.
* ``final_answer``: the answer of a completion without a box (the last line, after an anchor phrase).

``grade(answer, gold, problem, form, same)`` returns True/False, or None when it cannot read the answer
(the caller then falls back to plain math-verify). ``same(a, b)`` is the scalar comparison (math-verify).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from math import gcd, isqrt

MAX_ANSWER_CHARS = 300  # longer answers skip the structured reading (plain math-verify only)

# ---------------------------------------------------------------- vocabularies
_UNITS = {  # word -> (canonical unit, dimension)
    **{w: ("second", "time") for w in ("s", "sec", "secs", "second", "seconds")},
    **{w: ("minute", "time") for w in ("min", "mins", "minute", "minutes")},
    **{w: ("hour", "time") for w in ("h", "hr", "hrs", "hour", "hours")},
    **{w: ("day", "time") for w in ("day", "days")},
    **{w: ("week", "time") for w in ("week", "weeks")},
    **{w: ("month", "time") for w in ("month", "months")},
    **{w: ("year", "time") for w in ("year", "years", "yr", "yrs")},
    **{w: ("mm", "length") for w in ("mm", "millimeter", "millimeters", "millimetre", "millimetres")},
    **{w: ("cm", "length") for w in ("cm", "centimeter", "centimeters", "centimetre", "centimetres")},
    **{w: ("m", "length") for w in ("m", "meter", "meters", "metre", "metres")},
    **{w: ("km", "length") for w in ("km", "kilometer", "kilometers", "kilometre", "kilometres")},
    **{w: ("inch", "length") for w in ("in", "inch", "inches")},
    **{w: ("foot", "length") for w in ("ft", "foot", "feet")},
    **{w: ("yard", "length") for w in ("yd", "yds", "yard", "yards")},
    **{w: ("mile", "length") for w in ("mi", "mile", "miles")},
    **{w: ("dollar", "money") for w in ("dollar", "dollars", "usd")},
    **{w: ("cent", "money") for w in ("cent", "cents")},
    **{w: ("euro", "money") for w in ("euro", "euros")},
    **{w: ("gram", "mass") for w in ("g", "gram", "grams")},
    **{w: ("kg", "mass") for w in ("kg", "kilogram", "kilograms")},
    **{w: ("pound", "mass") for w in ("lb", "lbs", "pound", "pounds")},
    **{w: ("ounce", "mass") for w in ("oz", "ounce", "ounces")},
    **{w: ("degree", "angle") for w in ("degree", "degrees", "deg")},
    **{w: ("radian", "angle") for w in ("radian", "radians", "rad")},
}
_POWER_WORDS = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "pi", "or", "and", "cup", "cap",
               "infty", "sqrt", "frac", "circ", "pm", "mp", "le", "ge", "leq", "geq", "lt", "gt", "ne", "neq"}
_ONES = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_TENS = {w: 10 * i for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)}
_SCALES = {"hundred": 2, "thousand": 3, "million": 6, "billion": 9, "trillion": 12}
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ",
            "\u00b7": "\\cdot ", "\u00b0": "^\\circ", "\u03c0": "\\pi ", "\u221a": "\\sqrt", "\u221e": "\\infty ",
            "\u2264": "\\le ", "\u2265": "\\ge ", "\u222a": "\\cup ", "\u00b1": "\\pm ", "\u2260": "\\ne ",
            "\u2009": " ", "\u202f": " ", "\u00a0": " ", "\u2002": " ", "\u2003": " ", "\u20ac": " euro ",
            "\u00a3": " ", "\u2018": "'", "\u2019": "'"}

# ---------------------------------------------------------------- regular expressions (all linear)
_THOUSANDS_SEP = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\!|\\ | )\s?(?=\d{3}(?![\d/]))")
_PLAIN_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WRAPPERS = re.compile(r"\\(?:textbf|textit|textrm|text|mathrm|mathbf|mathit|mbox|operatorname|emph)(?![a-zA-Z])\s*"
                       r"(?:\{([^{}]*)\})?")
_SPACING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|\\displaystyle|(?<!\\)\\[!,;:> ]|\\q?quad|~")
_FRAC_SHORT = [(re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),
               (re.compile(r"\\[dt]?frac\s*(\{[^{}]*\})\s*(\d)"), r"\\frac\1{\2}"),
               (re.compile(r"\\[dt]?frac\s*(\d)\s*\{"), r"\\frac{\1}{"),
               (re.compile(r"\\[dt]frac"), r"\\frac")]
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z](?![a-zA-Z]))")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_E_NOTATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:[eE]|\\times\s*10\s*\^|\\cdot\s*10\s*\^|\*\s*10\s*\^|x\s*10\s*\^)"
                         r"\s*\{?\s*([+-]?\d{1,3})\s*\}?")
_MAGNITUDE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(thousand|million|billion|trillion)\b", re.IGNORECASE)
_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_BASE = re.compile(r"(\d+)_\{?(\d+)\}?")
_MIXED = re.compile(r"(-?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)\s*/\s*(\d+))")
_TAIL_WORDS = re.compile(r"(?:\s*(?:(?<![\\A-Za-z])[A-Za-z]+\.?|\^\s*\{?\d\}?|/|\(|\)))+$")
_INEQ = re.compile(r"\\leq?(?![a-zA-Z])|\\geq?(?![a-zA-Z])|<=|>=|<|>|\\lt(?![a-zA-Z])|\\gt(?![a-zA-Z])")
_CONSTANTS = re.compile(r"\\(?:pi|infty|sqrt|frac|cdot|times|circ|sin|cos|tan|log|ln|exp)(?![a-zA-Z])|\\|"
                        r"\bi\b|(?<=\d)i\b|\be\b")
_SENTENCE_NUMBER = re.compile(r"(?<![\w.])-?\\?\$?\d[\d,]*(?:\.\d+)?(?![\w.]|\.\d)")
_CHOICE = re.compile(r"\(?([A-H])\)?(?:[.:)]\s*|\s+|$)([A-Za-z][A-Za-z' -]*)?")
_ANCHOR = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)?\s*:?", re.IGNORECASE)
_CONNECTIVE = re.compile(r"\b(?:is|are|was|equals|be|gives|get|obtain|so|thus|therefore|hence|"
                         r"(?:simplifies|reduces|comes|equal) to)\b|:", re.IGNORECASE)
_INLINE_MATH = re.compile(r"\$([^$]{1,300})\$|\\\((.{1,300}?)\\\)")
_TEMPLATE = re.compile(r"\((\s*\\?[A-Za-z]\w*\s*(?:,\s*\\?[A-Za-z]\w*\s*)+)\)")
_DEC_FRACTION = re.compile(r"\d\.\d|(?<!\d)\.\d")
_INT_FRAC = re.compile(r"\\frac\{(\d+)\}\{(\d+)\}|(?<![\d.])(\d+)\s*/\s*(\d+)(?![\d.])")
_SQRT_ARG = re.compile(r"\\sqrt\{(\d+)\}")
_ROOT_IN_DENOM = re.compile(r"\\frac\{[^{}]*\}\{[^{}]*\\sqrt|/\s*\(?\s*\d*\s*\\sqrt")


@dataclass(frozen=True)
class Form:
    """What a problem demands of the answer's form (all False/empty: any equal value is right)."""

    fraction: bool = False  # a common/improper fraction in lowest terms: no decimals, no mixed numbers
    decimal: bool = False  # digits with a decimal point: no fractions, radicals or pi
    radical: bool = False  # simplest radical form: square-free radicands, none in a denominator
    factored: bool = False  # a product at the top level
    expanded: bool = False  # no parentheses left
    mixed: bool = False  # a mixed number (or an integer)
    interval: bool = False  # interval notation: no inequalities
    units: frozenset[str] = field(default_factory=frozenset)  # canonical units the problem asks for


FORM_NAMES = ("fraction", "decimal", "radical", "factored", "expanded", "mixed", "interval")
_FORM_PHRASES = {
    "fraction": r"common fraction|improper fraction|as a fraction|fraction in lowest terms|lowest terms|"
                r"simplest fractional form|simplified fraction|reduced fraction",
    "decimal": r"as a decimal|decimal to the nearest|to a (?:terminating )?decimal|in decimal form|"
               r"\(as a decimal\)|expressed as a decimal|nearest (?:tenth|hundredth|thousandth)",
    "radical": r"simplest radical form|rational(?:ize)? (?:the )?denominator|with a rational denominator",
    "factored": r"\bfactor\b(?! of)|factored form|factor completely|factor the expression",
    "expanded": r"\bexpand\b|in the form \$?\s*[A-Z]\s*\w\^?\d?\s*\+",
    "mixed": r"mixed number",
    "interval": r"interval notation",
}


def infer_form(problem: str | None) -> Form:
    """The form a careful grader reads off the problem text (phrases such as "as a common fraction")."""
    if not problem:
        return Form()
    text = problem[-3000:]
    flags = {name: bool(re.search(rx, text, re.IGNORECASE)) for name, rx in _FORM_PHRASES.items()}
    if flags["fraction"] and flags["radical"]:
        flags["fraction"] = False  # "a common fraction in simplest radical form": radicals allowed
    if re.search(r"\bsimplify\b|\bsimplest\b", text, re.IGNORECASE):
        flags["radical"] = True  # applied only to answers with radicals (see form_ok)
    return Form(**flags, units=frozenset(asked_units(text)))


def parse_form(required_form: str | Form | None) -> Form:
    """A ``Form`` from a name or comma-separated names in ``FORM_NAMES`` (or a ``Form``)."""
    if required_form is None or isinstance(required_form, Form):
        return required_form or Form()
    names = [n.strip().lower() for n in str(required_form).split(",") if n.strip()]
    bad = [n for n in names if n not in FORM_NAMES]
    if bad:
        raise ValueError(f"required_form={required_form!r} is invalid: allowed forms among {FORM_NAMES}")
    return Form(**{n: True for n in names})


def asked_units(problem: str) -> set[str]:
    """Units the problem asks for: "in hours", "how many minutes", "in square inches", "In cents"."""
    units = set()
    for hit in re.finditer(r"\b(?:in|how many|how much|number of|measure of)\s+((?:square|cubic)\s+)?"
                           r"([a-z]+)(?:\s+per\s+([a-z]+))?", problem, re.IGNORECASE):
        for word in (hit.group(2), hit.group(3)):
            unit = _UNITS.get((word or "").lower())
            if unit and len(word) > 2:
                units.add(unit[0] + ("^" + str(_POWER_WORDS[hit.group(1).split()[0].lower()])
                                     if hit.group(1) and word is hit.group(2) else ""))
    if re.search(r"\\\$|\$\s?\d|\d\$(?!\w)|\bdollars?\b", problem) and not any(u in units for u in ("cent", "euro")):
        units.add("dollar@default")
    if re.search(r"%|\bpercent", problem, re.IGNORECASE):
        units.add("percent@default")
    if re.search(r"\bdegree", problem, re.IGNORECASE):
        units.add("degree@default")
    return units


# ---------------------------------------------------------------- cleaning one answer string
@dataclass
class Clean:
    """One answer as plain LaTeX plus what was stripped off it."""

    text: str
    units: set[str] = field(default_factory=set)
    degree: bool = False
    mixed: bool = False


def clean(raw: str) -> Clean:
    """Plain LaTeX for one answer; units, a degree sign and currency are stripped and recorded."""
    s = raw
    for a, b in _UNICODE.items():
        s = s.replace(a, b)
    s = _THOUSANDS_SEP.sub("", s)
    s = re.sub(r"(?:\^\s*\{?\s*\\circ\s*\}?)\s*(?:[CF]|\\mathrm\{[CF]\})(?![A-Za-z])", " degrees ", s)
    s = re.sub(r"\\langle(?![a-zA-Z])", "(", re.sub(r"\\rangle(?![a-zA-Z])", ")", s))
    out = Clean("")
    if re.search(r"\\\$\s*\d|\$\s*\d(?![^$]*\$)", s):  # a dollar sign before a number, not a math delimiter
        out.units.add("dollar")
    s = re.sub(r"\\\$", " ", s)
    s = re.sub(r"\\\(|\\\)|\\\[|\\\]|\$", " ", s)
    for _ in range(2):
        s = _WRAPPERS.sub(lambda m: f" {m.group(1) or ''} ", s)
    s = _SPACING.sub(" ", s)
    for rx, rep in _FRAC_SHORT:
        s = rx.sub(rep, s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    if _DEGREE.search(s):
        out.degree = True
        s = _DEGREE.sub(" ", s)
    s = re.sub(r"\\approx.*$", "", s)
    if re.search(r"\\?%|\bpercent\b", s):
        out.units.add("percent")
        s = re.sub(r"\\?%|\bpercent\b", " ", s)
    s = s.replace("**", " ").strip().rstrip(".;:!").strip()
    s = _number_words(s)
    s = _MAGNITUDE.sub(lambda m: _plain(m.group(1), _SCALES[m.group(2).lower()]), s)
    s = _strip_units(s, out)
    s = s.strip().rstrip(".").strip()
    if s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    s = _E_NOTATION.sub(lambda m: _plain(m.group(1), int(m.group(2))), s)
    s = _REPEATING.sub(_repeating_fraction, s)
    if _BASE.fullmatch(s):
        s = _BASE.fullmatch(s).group(1)
    mixed = _MIXED.fullmatch(s)
    if mixed:
        sign, whole, num, den = mixed.group(1), mixed.group(2), mixed.group(3) or mixed.group(5), \
            mixed.group(4) or mixed.group(6)
        if int(num) < int(den):
            out.mixed = True
            s = f"{sign}({whole}+\\frac{{{num}}}{{{den}}})"
    if _PLAIN_THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    out.text = re.sub(r"\s+", " ", s).strip()
    return out


def _brackets_balance(s: str) -> bool:
    """Braces nest and as many brackets open as close (an interval may mix ``(`` with ``]``)."""
    return _balanced(s) and s.count("(") + s.count("[") == s.count(")") + s.count("]")


def _plain(mantissa: str, exponent: int) -> str:
    """``mantissa * 10**exponent`` written out exactly (exponents are at most three digits)."""
    return format((Decimal(mantissa) * Decimal(10) ** exponent).normalize(), "f")


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def _repeating_fraction(m: re.Match) -> str:
    """``a.b\\overline{c}`` as an exact ``\\frac``."""
    sign, whole, head, rep = m.group(1), m.group(2) or "0", m.group(3), m.group(4)
    value = int(whole) + Fraction(int(head + rep) - int(head or "0"), 10 ** len(head) * (10 ** len(rep) - 1))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _number_words(s: str) -> str:
    """A leading run of number words (``seventy-eight``, ``one hundred five``) as digits."""
    words = re.match(r"[A-Za-z]+(?:[\s-]+[A-Za-z]+)*", s)
    if not words:
        return s
    tokens = re.split(r"[\s-]+", words.group().lower())
    total, current, used = 0, 0, 0
    for tok in tokens:
        if tok in _ONES:
            current += _ONES[tok]
        elif tok in _TENS:
            current += _TENS[tok]
        elif tok in _SCALES and used:
            if tok == "hundred":
                current *= 100
            else:
                total, current = total + current * 10 ** _SCALES[tok], 0
        elif tok == "and" and used:
            pass
        else:
            break
        used += 1
    if not used or tokens[used - 1] == "and":
        return s
    consumed = re.match(rf"[A-Za-z]+(?:[\s-]+[A-Za-z]+){{{used - 1}}}", s).group()
    return str(total + current) + s[len(consumed):]


def _strip_units(s: str, out: Clean) -> str:
    """Trailing words after a numeric answer are units (recorded when known); other text stays."""
    tail = _TAIL_WORDS.search(s)
    if not tail or tail.start() == 0:
        return s
    head = s[: tail.start()]
    if not re.search(r"\d|\\pi|\\sqrt", head) or re.search(r"[A-Za-z]\s*$", head.replace("\\pi", "")):
        return s
    words = re.findall(r"\\?[A-Za-z]+", tail.group())
    if any(w.lstrip("\\").lower() in _MATH_WORDS or w.startswith("\\") for w in words) or all(
            len(w) == 1 and w.lower() not in _UNITS for w in words):
        return s
    power = 2 if re.search(r"\^\s*\{?2|\bsquare\b|\bsq\b", tail.group(), re.IGNORECASE) else \
        3 if re.search(r"\^\s*\{?3|\bcubic\b", tail.group(), re.IGNORECASE) else 1
    for w in words:
        unit = _UNITS.get(w.lower())
        if unit:
            out.units.add(unit[0] + (f"^{power}" if power > 1 and unit[1] == "length" else ""))
    return head


# ---------------------------------------------------------------- structure
@dataclass
class Node:
    """An answer's shape: kind in scalar/text/choice/seq/set/union/eq; ``items`` for containers."""

    kind: str
    value: str = ""
    items: list[Node] = field(default_factory=list)
    brackets: str = ""  # a seq's opening and closing bracket, e.g. "(]"
    bare: bool = False  # a list written without brackets (order kept for ordered golds)
    name: str = ""  # the name of a named component (``a`` in ``a = -2``)


def structure(text: str, problem: str | None = None) -> Node:
    """The tree of one cleaned answer."""
    s = text.strip()
    words = re.findall(r"[A-Za-z]+", s)
    if re.fullmatch(r"[A-Za-z][A-Za-z' -]*", s) and all(len(w) > 1 or w in "aA" for w in words) and \
            any(len(w) > 2 and w.lower() not in _MATH_WORDS for w in words):
        return Node("text", _text_key(s))
    mat = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.DOTALL)
    if mat and "&" not in mat.group(1):
        rows = [r.strip() for r in mat.group(1).split("\\\\") if r.strip()]
        return Node("seq", items=[structure(r) for r in rows], brackets="()")
    if s.startswith("\\{") and s.endswith("\\}"):
        return Node("set", items=_items(s[2:-2], problem))
    if "\\cup" in s and _split_top(s, ("\\cup",))[1:]:
        return Node("union", items=[structure(p) for p in _split_top(s, ("\\cup",))])
    parts = _split_top(s, (",", ";", " or ", " and "))
    if len(parts) > 1:
        if all(_INEQ.search(p) for p in parts):
            items = [structure(p) for p in parts]
            if all(n.kind == "seq" for n in items):
                joined = _split_top(s, (" and ",))
                return _intersection(items) if len(joined) == 2 == len(items) else Node("union", items=items)
        return _named_or_list(parts, problem)
    if re.search(r"\\pm|\\mp", s):
        return Node("set", items=[structure(v) for v in _expand_pm(s)], bare=True)
    s = re.sub(r"^[A-Za-z]\s*\\in\s*", "", s)
    if _INEQ.search(s):
        interval = _inequality_interval(s)
        if interval:
            return interval
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _matching(s) == len(s) - 1:
        inner = _split_top(s[1:-1], (",",))
        if len(inner) > 1:
            return Node("seq", items=[structure(p) for p in inner], brackets=s[0] + s[-1])
    if "=" in s:
        sides = [p.strip() for p in s.split("=")]
        if all(sides) and not _INEQ.search(s):
            names = r"\\?[A-Za-z][\w\\ ]*"
            if re.fullmatch(rf"{names}|\(\s*{names}(?:,\s*{names})+\)", sides[0]) and not _has_variable(sides[-1]):
                return replace(structure(sides[-1]), name=sides[0].replace(" ", ""))
            if not any(_has_variable(side) for side in sides):
                return structure(sides[-1])  # a computation ending in its value: "12 - 3 = 9"
            return Node("eq", f"({sides[-2]})-({sides[-1]})")
    choice = _CHOICE.fullmatch(s)
    if choice and (s[0] == "(" or len(s) == 1 or s[1] in ".:)"):
        return Node("choice", choice.group(1), name=_text_key(choice.group(2) or ""))
    return Node("scalar", s)


def _items(s: str, problem: str | None) -> list[Node]:
    """Comma/or/and-separated items, each ``\\pm`` expanded, each ``x = v`` reduced to v."""
    return [structure(variant, problem) for part in _split_top(s, (",", ";", " or ", " and ")) if part.strip()
            for variant in _expand_pm(part.strip())]


def _named_or_list(parts: list[str], problem: str | None) -> Node:
    """A bare list; named components (distinct names) are put in the problem's tuple-template order."""
    items = _items(",".join(parts), problem)
    names = [n.name for n in items]
    if len(names) == len(items) and len(set(names)) == len(names) and all(names):
        for hit in _TEMPLATE.finditer(problem or ""):
            order = [t.strip() for t in hit.group(1).split(",")]
            if sorted(order) == sorted(names):
                items = sorted(items, key=lambda n: order.index(n.name))
                break
    return Node("set", items=items, bare=True)


def _expand_pm(part: str) -> list[str]:
    """``a \\pm b`` as two answers."""
    m = re.search(r"\\pm|\\mp", part)
    if not m:
        return [part]
    return [part[: m.start()] + "+" + part[m.end():], part[: m.start()] + "-" + part[m.end():]]


def _inequality_interval(s: str) -> Node | None:
    """``3 < x \\le 4``, ``y \\le 0``, ``x > 2`` as an interval seq; None if not of that shape."""
    toks, ops = [t.strip() for t in _INEQ.split(s)], _INEQ.findall(s)
    if len(toks) == 3 and _has_variable(toks[1]) and not _has_variable(toks[0]) and not _has_variable(toks[2]):
        lo, hi = (toks[0], toks[2]) if "<" in ops[0] or "l" in ops[0] else (toks[2], toks[0])
        if ("<" in ops[0] or "l" in ops[0]) != ("<" in ops[1] or "l" in ops[1]):
            return None
        lo_op, hi_op = (ops[0], ops[1]) if lo == toks[0] else (ops[1], ops[0])
        return Node("seq", items=[Node("scalar", lo), Node("scalar", hi)],
                    brackets=("[" if "=" in lo_op or "q" in lo_op or lo_op in ("\\le", "\\ge") else "(")
                    + ("]" if "=" in hi_op or "q" in hi_op or hi_op in ("\\le", "\\ge") else ")"))
    if len(toks) == 2 and _has_variable(toks[0]) != _has_variable(toks[1]):
        var_left = _has_variable(toks[0])
        bound = toks[1] if var_left else toks[0]
        less = ("<" in ops[0] or "l" in ops[0]) == var_left
        closed = "=" in ops[0] or ops[0] in ("\\le", "\\ge", "\\leq", "\\geq")
        items = [Node("scalar", "-\\infty"), Node("scalar", bound)] if less else \
            [Node("scalar", bound), Node("scalar", "\\infty")]
        return Node("seq", items=items, brackets=("(" + ("]" if closed else ")")) if less
                    else (("[" if closed else "(") + ")"))
    return None


def _intersection(items: list[Node]) -> Node:
    """``x > a and x < b``: one lower and one upper ray make one interval (anything else: a union)."""
    lower = [n for n in items if n.items[1].value == "\\infty"]
    upper = [n for n in items if n.items[0].value == "-\\infty"]
    if len(lower) == len(upper) == 1:
        return Node("seq", items=[lower[0].items[0], upper[0].items[1]],
                    brackets=lower[0].brackets[0] + upper[0].brackets[1])
    return Node("union", items=items)


def _has_variable(s: str) -> bool:
    """A letter that is not part of a LaTeX command, pi, infinity or the imaginary unit."""
    return bool(re.search(r"[a-zA-Z]", re.sub(_CONSTANTS, "", s)))


def _split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """Split at separators outside (), [], {}; an interval's comma (``(3,4]``) stays inside."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            hit = next((sep for sep in seps if s.startswith(sep, i)), None)
            if hit and s[i - 1: i] != "\\":
                parts.append(s[start:i])
                i += len(hit)
                start = i
                continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _matching(s: str) -> int:
    """Index of the bracket closing ``s[0]`` (any of ()[] closes any), or -1."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0:
            return i
    return -1


def _text_key(s: str) -> str:
    """Lower case words without articles or punctuation."""
    words = re.findall(r"[a-z0-9]+", s.lower())
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def options(problem: str | None) -> dict[str, str]:
    """Multiple-choice options in the problem: letter -> text key ("(C) Plane" -> {"C": "plane"})."""
    return {hit.group(1): _text_key(hit.group(2)) for hit in re.finditer(
        r"\(([A-H])\)\s*([A-Za-z][A-Za-z -]{0,40}?)(?=\s*\(|\s{2}|\s*$|\s*\n|\s*[.$\\])", problem or "")}


# ---------------------------------------------------------------- comparison, form and units
Same = Callable[[str, str], "bool | None"]


def equal(gold: Node, pred: Node, same: Same) -> bool | None:
    """Whether two trees hold the same answer; None when a scalar of the prediction cannot be read."""
    if pred.kind == "set" and pred.bare and len(pred.items) == 1:
        pred = pred.items[0]
    if gold.kind == "set" and gold.bare and len(gold.items) == 1:
        gold = gold.items[0]
    if gold.kind == "scalar":
        return same(gold.value, pred.value) if pred.kind == "scalar" else False
    if gold.kind == "text":
        return pred.kind == "text" and pred.value == gold.value
    if gold.kind == "eq":
        return pred.kind == "eq" and bool(same(gold.value, pred.value))
    if gold.kind == "seq":
        ordered = (pred.kind == "seq" and pred.brackets == gold.brackets) or (
            pred.kind == "set" and pred.bare and gold.brackets == "()")
        return ordered and len(pred.items) == len(gold.items) and all(
            bool(equal(g, p, same)) for g, p in zip(gold.items, pred.items))
    if gold.kind in ("set", "union"):
        if pred.kind != gold.kind or len(pred.items) != len(gold.items):
            return False
        unused = list(pred.items)
        for g in gold.items:
            hit = next((p for p in unused if equal(g, p, same)), None)
            if hit is None:
                return False
            unused.remove(hit)
        return True
    return False


def choice_equal(gold: Node, pred: Node, opts: dict[str, str]) -> bool:
    """A letter answer: the letter, the letter with its option's text, or the option's text alone."""
    if pred.kind == "choice":
        text_conflict = pred.name and pred.name in opts.values() and opts.get(gold.value) != pred.name
        return pred.value == gold.value and not text_conflict
    if pred.kind == "text":
        return bool(opts) and opts.get(gold.value) == pred.value
    return False


def form_ok(form: Form, pred: Clean, gold: Clean, raw: str) -> bool:
    """Whether the prediction is written in the form the problem demands."""
    t, g = pred.text, gold.text
    if form.fraction and (_DEC_FRACTION.search(t) or pred.mixed or not _lowest_terms(t)):
        return False
    if form.mixed and gold.mixed and not pred.mixed:
        return False
    if form.decimal and not re.search(r"\\frac|/|\\sqrt|\\pi", g) and re.search(r"\\frac|/|\\sqrt|\\pi", t):
        return False
    if form.radical and "\\sqrt" in g and (_DEC_FRACTION.search(t) or _ROOT_IN_DENOM.search(t) or any(
            _square_factor(int(n)) for n in _SQRT_ARG.findall(t))):
        return False
    if form.factored and "(" in g and _top_level_sum(t):
        return False
    if form.expanded and "(" not in g and "(" in t:
        return False
    return not (form.interval and _INEQ.search(raw))


def units_ok(pred: Clean, gold: Clean, asked: frozenset[str]) -> bool:
    """No unit in the prediction contradicts the gold's unit or the unit the problem asks for."""
    for unit in pred.units:
        dim = _dimension(unit)
        gold_units = {u for u in gold.units if _dimension(u) == dim}
        asked_units = {u.split("@")[0] for u in asked if _dimension(u) == dim}
        if (gold_units and unit not in gold_units) or (not gold_units and asked_units and unit not in asked_units):
            return False
    if "percent" in pred.units and "percent" not in gold.units and not any(u.startswith("percent") for u in asked):
        return False
    degrees_asked = gold.degree or "degree" in gold.units or any(u.startswith("degree") for u in asked)
    if pred.degree and not gold.degree and ("\\pi" in gold.text or "radian" in asked):
        return False
    if degrees_asked and "\\pi" in pred.text and "\\pi" not in gold.text:
        return False
    return not (pred.degree and "radian" in asked)


def _dimension(unit: str) -> str:
    name, _, power = unit.split("@")[0].partition("^")
    dims = {canon: dim for canon, dim in _UNITS.values()}
    return dims.get(name, name) + (f"^{power}" if power else "")


def _lowest_terms(t: str) -> bool:
    for m in _INT_FRAC.finditer(t):
        num, den = int(m.group(1) or m.group(3)), int(m.group(2) or m.group(4))
        if den and gcd(num, den) != 1:
            return False
    return True


def _square_factor(n: int) -> bool:
    """Whether n > 1 has a square factor > 1 (its root is not simplest)."""
    if n > 10**8:
        return False
    return any(n % (k * k) == 0 for k in range(2, isqrt(n) + 1))


def _top_level_sum(t: str) -> bool:
    """A + or - outside every bracket (a leading sign does not count)."""
    depth = 0
    for i, ch in enumerate(t.strip()):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and ch in "+-" and i > 0:
            return True
    return False


# ---------------------------------------------------------------- answers without a box, and the verdict
def final_answer(completion: str) -> str | None:
    """The answer of a completion without a box: its last line, after an anchor ("the answer is", "####",
    "Final answer:") or the last connective ("is", "so", "therefore", ":"), or its last inline math."""
    lines = [ln.strip() for ln in completion[-2000:].splitlines() if ln.strip()]
    if not lines:
        return None
    line = re.sub(r"^#+\s*|\*\*", " ", lines[-1][-400:]).strip()
    anchors = list(_ANCHOR.finditer(line))
    maths = list(_INLINE_MATH.finditer(line))
    if anchors:
        cand = line[anchors[-1].end():]
    elif maths and not line[maths[-1].end():].strip(" .,;!"):
        cand = (maths[-1].group(1) or maths[-1].group(2)).rsplit("=", 1)[-1]
    else:
        conns = list(_CONNECTIVE.finditer(line))
        cand = line[conns[-1].end():] if conns else line
        numbers = _SENTENCE_NUMBER.findall(cand)
        if len(re.findall(r"[A-Za-z]{3,}", cand)) > 2 and len(numbers) == 1:
            cand = numbers[0]  # a sentence with one number in it ("Janet makes $18 every day.")
    cand = cand.strip().rstrip(".").strip()
    odd = sum(not (ch.isascii() and ch.isprintable()) and ch not in _UNICODE for ch in cand)
    return cand if 0 < len(cand) <= MAX_ANSWER_CHARS and not odd else None


def grade(answer: str, gold: str, problem: str | None, form: Form, same: Same) -> bool | None:
    """A careful grader's verdict on one extracted answer, or None when the answer cannot be read."""
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return None
    g, p = clean(gold), clean(answer)
    if not p.text or not g.text or not _brackets_balance(p.text):
        return None
    gold_node, pred_node = structure(g.text, problem), structure(p.text, problem)
    if pred_node.kind == "text" and gold_node.kind not in ("text", "choice"):
        return None  # words where a value is expected: leave it to math-verify's own extraction
    verdict = (choice_equal(gold_node, pred_node, options(problem)) if gold_node.kind == "choice"
               else equal(gold_node, pred_node, same))
    if not verdict:
        return verdict
    return form_ok(form, p, g, answer) and units_ok(p, g, form.units)


def guards_ok(answer: str, gold: str, form: Form) -> bool:
    """Form and unit checks alone, for an answer that only plain math-verify could read."""
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return True
    g, p = clean(gold), clean(answer)
    return form_ok(form, p, g, answer) and units_ok(p, g, form.units)
