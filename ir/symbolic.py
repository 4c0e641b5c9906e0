"""Symbolic dimensions: integer polynomials over named symbols.

A dim is an `int` or a `SymExpr` such as `seq`, `seq + 1`, `2*seq` or
`batch*seq`. Symbols stand for positive integers (tensor extents). Addition,
subtraction and multiplication are exact; floor division and modulo by an
integer are exact where the result is again a polynomial (`(2*seq) // 2`),
and otherwise undefined (`None`), which callers treat as an unknown dim.
"""
from __future__ import annotations

import re
from typing import Mapping, Union

Monomial = tuple[str, ...]  # sorted symbol names; () is the constant term


class SymExpr:
    """An immutable integer polynomial. Use `sym("seq")` to make a symbol."""

    __slots__ = ("_terms", "_hash")

    def __init__(self, terms: Mapping[Monomial, int]):
        self._terms = {m: c for m, c in terms.items() if c != 0}
        self._hash = hash(frozenset(self._terms.items()))

    # ---- construction and inspection -------------------------------------------------
    @property
    def terms(self) -> Mapping[Monomial, int]:
        return self._terms

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s for m in self._terms for s in m)

    @property
    def constant(self) -> int:
        return self._terms.get((), 0)

    def evaluate(self, bindings: Mapping[str, int]) -> int:
        total = 0
        for mono, coeff in self._terms.items():
            term = coeff
            for s in mono:
                try:
                    term *= bindings[s]
                except KeyError:
                    raise KeyError(f"symbol {s!r} is not bound") from None
            total += term
        return total

    def substitute(self, bindings: Mapping[str, "Dim"]) -> "Dim":
        total: Dim = 0
        for mono, coeff in self._terms.items():
            term: Dim = coeff
            for s in mono:
                term = mul(term, bindings.get(s, SymExpr({(s,): 1})))
            total = add(total, term)
        return total

    # ---- arithmetic ------------------------------------------------------------------
    def __add__(self, other):
        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __mul__(self, other):
        return mul(self, other)

    __rmul__ = __mul__

    def __neg__(self):
        return mul(self, -1)

    def __floordiv__(self, other):
        return floordiv(self, other)

    def __mod__(self, other):
        return mod(self, other)

    def __eq__(self, other):
        if isinstance(other, SymExpr):
            return self._terms == other._terms
        return False  # a normalised SymExpr is never a plain int

    def __hash__(self):
        return self._hash

    def __bool__(self):
        return True  # a dim expression with a symbol is never zero

    def __repr__(self):
        return f"SymExpr({self})"

    def __str__(self):
        parts = []
        # Highest degree first, then alphabetical: `2*seq + 1`, `batch*seq + seq`.
        for mono in sorted(self._terms, key=lambda m: (-len(m), m)):
            coeff = self._terms[mono]
            body = "*".join(mono)
            if not mono:
                text = str(abs(coeff))
            elif abs(coeff) == 1:
                text = body
            else:
                text = f"{abs(coeff)}*{body}"
            if not parts:
                parts.append(text if coeff > 0 else f"-{text}")
            else:
                parts.append(f"+ {text}" if coeff > 0 else f"- {text}")
        return " ".join(parts) if parts else "0"


Dim = Union[int, SymExpr]


def sym(name: str) -> SymExpr:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"symbol names are identifiers, got {name!r}")
    return SymExpr({(name,): 1})


def _terms(d: Dim) -> Mapping[Monomial, int]:
    if isinstance(d, SymExpr):
        return d.terms
    return {(): int(d)}


def _normalise(terms: Mapping[Monomial, int]) -> Dim:
    nonzero = {m: c for m, c in terms.items() if c != 0}
    if not nonzero:
        return 0
    if set(nonzero) == {()}:
        return nonzero[()]
    return SymExpr(nonzero)


def add(a: Dim, b: Dim) -> Dim:
    if not isinstance(a, SymExpr) and not isinstance(b, SymExpr):
        return int(a) + int(b)
    out = dict(_terms(a))
    for m, c in _terms(b).items():
        out[m] = out.get(m, 0) + c
    return _normalise(out)


def sub(a: Dim, b: Dim) -> Dim:
    return add(a, mul(b, -1))


def mul(a: Dim, b: Dim) -> Dim:
    if not isinstance(a, SymExpr) and not isinstance(b, SymExpr):
        return int(a) * int(b)
    out: dict[Monomial, int] = {}
    for ma, ca in _terms(a).items():
        for mb, cb in _terms(b).items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0) + ca * cb
    return _normalise(out)


def floordiv(a: Dim, b: Dim) -> Dim | None:
    """a // b, or None when the quotient is not a polynomial (or b is symbolic and not a factor)."""
    if not isinstance(a, SymExpr) and not isinstance(b, SymExpr):
        return int(a) // int(b) if int(b) != 0 else None
    if isinstance(b, SymExpr):
        # Exact division by a single monomial, e.g. (batch*seq) // seq.
        if len(b.terms) != 1:
            return 1 if a == b else None
        (mb, cb), = b.terms.items()
        out = {}
        for m, c in _terms(a).items():
            rest = list(m)
            for s in mb:
                if s not in rest:
                    return None
                rest.remove(s)
            if c % cb:
                return None
            out[tuple(rest)] = c // cb
        return _normalise(out)
    b = int(b)
    if b == 0:
        return None
    terms = _terms(a)
    if all(c % b == 0 for m, c in terms.items() if m):
        # Symbolic part divides exactly; the constant may floor.
        out = {m: c // b for m, c in terms.items() if m}
        out[()] = terms.get((), 0) // b
        return _normalise(out)
    return None


def mod(a: Dim, b: Dim) -> Dim | None:
    if not isinstance(a, SymExpr) and not isinstance(b, SymExpr):
        return int(a) % int(b) if int(b) != 0 else None
    if isinstance(b, SymExpr):
        return 0 if floordiv(a, b) is not None else None
    b = int(b)
    if b and all(c % b == 0 for m, c in _terms(a).items() if m):
        return _terms(a).get((), 0) % b
    return None


def is_static(d) -> bool:
    return isinstance(d, (int,)) and not isinstance(d, bool)


def compare(a: Dim, b: Dim) -> int | None:
    """Sign of a - b where it is provable for all positive symbol values, else None."""
    diff = sub(a, b)
    if not isinstance(diff, SymExpr):
        return (diff > 0) - (diff < 0)
    coeffs = [c for m, c in diff.terms.items() if m]
    const = diff.constant
    # Each monomial is >= 1 for positive symbols.
    if all(c > 0 for c in coeffs) and sum(coeffs) + const > 0:
        return 1
    if all(c < 0 for c in coeffs) and sum(coeffs) + const < 0:
        return -1
    return None


def equal(a: Dim, b: Dim) -> bool | None:
    """True / False where provable, None where it depends on the symbols' values."""
    c = compare(a, b)
    if c is None:
        return True if sub(a, b) == 0 else None
    return c == 0


def provably_le(a: Dim, b: Dim) -> bool:
    """a <= b for all positive symbol values (each monomial is >= 1)."""
    diff = sub(b, a)
    if not isinstance(diff, SymExpr):
        return diff >= 0
    coeffs = [c for m, c in diff.terms.items() if m]
    return all(c >= 0 for c in coeffs) and sum(coeffs) + diff.constant >= 0


def dim_min(a: Dim, b: Dim) -> Dim | None:
    return a if provably_le(a, b) else b if provably_le(b, a) else None


def dim_max(a: Dim, b: Dim) -> Dim | None:
    return b if provably_le(a, b) else a if provably_le(b, a) else None


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


def parse(text: str) -> Dim:
    """Parse `seq`, `seq + 1`, `2*seq - 3`, `batch*seq` (the printer's own format)."""
    tokens = [t for t in _TOKEN.findall(text) if any(t)]
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def atom():
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ValueError(f"unexpected end of dim expression {text!r}")
        pos += 1
        num, name, op = tok
        if num:
            return int(num)
        if name:
            return sym(name)
        if op == "(":
            v = expr()
            if peek() is None or peek()[2] != ")":
                raise ValueError(f"missing ')' in {text!r}")
            pos += 1
            return v
        if op == "-":
            return mul(atom(), -1)
        raise ValueError(f"unexpected {op!r} in dim expression {text!r}")

    def term():
        nonlocal pos
        v = atom()
        while peek() is not None and peek()[2] == "*":
            pos += 1
            v = mul(v, atom())
        return v

    def expr():
        nonlocal pos
        v = term()
        while peek() is not None and peek()[2] in ("+", "-"):
            op = peek()[2]
            pos += 1
            v = add(v, term()) if op == "+" else sub(v, term())
        return v

    value = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing text in dim expression {text!r}")
    return value
