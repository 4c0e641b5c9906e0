"""Symbolic dimensions: integer polynomials over named symbols and a few atoms.

A dim is an `int` or a `SymExpr` such as `seq`, `seq + 1`, `2*seq` or
`batch*seq`. Symbols stand for positive integers (tensor extents). Addition,
subtraction and multiplication are exact. Floor division by a positive integer
is a polynomial where it divides exactly (`(2*seq) // 2 == seq`) and otherwise
an atom, `(seq // 8)`, that takes part in polynomials like a symbol
(`2*(seq // 8) + 1`); `min(a, b)` / `max(a, b)` are atoms where neither side is
provably the smaller. Compressed attention's `seq // rate` entries and a
top-k's `min(k, seq)` are such dims. Division by a symbolic divisor is exact
or undefined (`None`), which callers treat as an unknown dim.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Union


class Atom:
    """`(arg // divisor)`, `min(a, b)` or `max(a, b)`: a factor of a monomial that is not a symbol."""

    __slots__ = ("kind", "args", "_key")

    def __init__(self, kind: str, args: tuple):
        self.kind, self.args = kind, args
        self._key = str(self)

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(x for a in self.args if isinstance(a, SymExpr) for x in a.symbols)

    def evaluate(self, bindings: Mapping[str, int]) -> int:
        vals = [a.evaluate(bindings) if isinstance(a, SymExpr) else a for a in self.args]
        return _APPLY[self.kind](*vals)

    def substitute(self, bindings: Mapping[str, "Dim"]) -> "Dim":
        args = [a.substitute(bindings) if isinstance(a, SymExpr) else a for a in self.args]
        return _BUILD[self.kind](*args)

    def __eq__(self, other):
        return isinstance(other, Atom) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __str__(self):
        if self.kind == "floordiv":
            a = self.args[0]
            return f"({a} // {self.args[1]})" if len(a.terms) == 1 else f"(({a}) // {self.args[1]})"
        return f"{self.kind}({self.args[0]}, {self.args[1]})"

    __repr__ = __str__


Factor = Union[str, Atom]
Monomial = tuple[Factor, ...]  # sorted factors (symbol names, atoms); () is the constant term


def _factor_key(f: Factor) -> tuple[int, str]:
    return (1, f._key) if isinstance(f, Atom) else (0, f)


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
        return frozenset(x for m in self._terms for f in m for x in (f.symbols if isinstance(f, Atom) else (f,)))

    @property
    def is_polynomial(self) -> bool:
        """No floor-division / min / max atom inside."""
        return not any(isinstance(f, Atom) for m in self._terms for f in m)

    @property
    def constant(self) -> int:
        return self._terms.get((), 0)

    def evaluate(self, bindings: Mapping[str, int]) -> int:
        total = 0
        for mono, coeff in self._terms.items():
            term = coeff
            for s in mono:
                if isinstance(s, Atom):
                    term *= s.evaluate(bindings)
                    continue
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
                factor = s.substitute(bindings) if isinstance(s, Atom) else bindings.get(s, SymExpr({(s,): 1}))
                term = mul(term, factor)
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
        for mono in sorted(self._terms, key=lambda m: (-len(m), [_factor_key(f) for f in m])):
            coeff = self._terms[mono]
            body = "*".join(str(f) for f in mono)
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
            m = tuple(sorted(ma + mb, key=_factor_key))
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
    if b < 0:
        return floordiv(mul(a, -1), -b)
    # Terms whose coefficient b divides leave the floor: (8*seq + 9) // 8 == seq + 1 + (1 // 8).
    whole: dict[Monomial, int] = {}
    rest: dict[Monomial, int] = {}
    for m, c in _terms(a).items():
        if m and c % b == 0:
            whole[m] = c // b
        elif m:
            rest[m] = c
    const = _terms(a).get((), 0)
    whole[()] = const // b
    if not rest:
        return _normalise(whole)
    rest[()] = const % b
    inner = _normalise(rest)
    if isinstance(inner, SymExpr) and len(inner.terms) == 1:
        (m, c), = inner.terms.items()
        if c == 1 and len(m) == 1 and isinstance(m[0], Atom) and m[0].kind == "floordiv":
            # (x // p) // q == x // (p*q) for integers x and positive p, q.
            return add(_normalise(whole), floordiv(m[0].args[0], m[0].args[1] * b))
    return add(_normalise(whole), SymExpr({(Atom("floordiv", (inner, b)),): 1}))


def mod(a: Dim, b: Dim) -> Dim | None:
    """a % b (floor modulo): an int where decided, else a - b*(a // b) for an int b."""
    if not isinstance(a, SymExpr) and not isinstance(b, SymExpr):
        return int(a) % int(b) if int(b) != 0 else None
    if isinstance(b, SymExpr):
        return 0 if floordiv(a, b) is not None else None
    q = floordiv(a, b)
    return None if q is None else sub(a, mul(q, b))


def is_static(d) -> bool:
    return isinstance(d, (int,)) and not isinstance(d, bool)


def bounds(d: Dim) -> tuple[int | None, int | None]:
    """(lowest, highest) value of d over all positive symbol values; None where unbounded."""
    if not isinstance(d, SymExpr):
        return int(d), int(d)
    lo: int | None = 0
    hi: int | None = 0
    for mono, coeff in d.terms.items():
        mlo, mhi = _monomial_bounds(mono)
        if coeff < 0:
            mlo, mhi = (None if mhi is None else coeff * mhi), (None if mlo is None else coeff * mlo)
        else:
            mlo, mhi = (None if mlo is None else coeff * mlo), (None if mhi is None else coeff * mhi)
        lo = None if lo is None or mlo is None else lo + mlo
        hi = None if hi is None or mhi is None else hi + mhi
    return lo, hi


def _monomial_bounds(mono: Monomial) -> tuple[int | None, int | None]:
    lo: int | None = 1
    hi: int | None = 1
    for f in mono:
        flo, fhi = _factor_bounds(f)
        if flo is None or flo < 0:
            return None, None  # signs may flip: give up
        lo = lo * flo
        hi = None if hi is None or fhi is None else hi * fhi
    return lo, hi


def _factor_bounds(f: Factor) -> tuple[int | None, int | None]:
    if not isinstance(f, Atom):
        return 1, None  # a symbol is a positive integer
    (alo, ahi), (blo, bhi) = bounds(f.args[0]), bounds(f.args[1])
    if f.kind == "floordiv":
        return (None if alo is None else alo // f.args[1]), (None if ahi is None else ahi // f.args[1])
    if f.kind == "min":
        return (None if alo is None or blo is None else min(alo, blo)), \
            (ahi if bhi is None else bhi if ahi is None else min(ahi, bhi))
    return (alo if blo is None else blo if alo is None else max(alo, blo)), \
        (None if ahi is None or bhi is None else max(ahi, bhi))


def _lower(d: Dim, depth: int = 2) -> int | None:
    """A lower bound of d: its interval bound; that of d with each floor replaced by its rational
    bounds ((x - k + 1) / k <= x // k <= x / k), which proves `8*(seq // 8) <= seq`; or that of d with
    a `+max(a, b)` / `-min(a, b)` term replaced by one side (max(a, b) >= a), which proves `x <= max(x, 1)`."""
    lo = _lower_floors(d)
    if not isinstance(d, SymExpr) or depth == 0:
        return lo
    for mono, c in d.terms.items():
        if len(mono) == 1 and isinstance(mono[0], Atom) and (mono[0].kind, c > 0) in (("max", True), ("min", False)):
            rest = sub(d, mul(SymExpr({mono: 1}), c))
            for side in mono[0].args:
                alt = _lower(add(rest, mul(side, c)), depth - 1)
                if alt is not None and (lo is None or alt > lo):
                    lo = alt
    return lo


def _lower_floors(d: Dim) -> int | None:
    lo, _ = bounds(d)
    if not isinstance(d, SymExpr):
        return lo
    floors = {m: c for m, c in d.terms.items()
              if len(m) == 1 and isinstance(m[0], Atom) and m[0].kind == "floordiv"}
    if not floors:
        return lo
    scale = math.lcm(*(m[0].args[1] for m in floors))
    relaxed = mul(_normalise({m: c for m, c in d.terms.items() if m not in floors}), scale)
    for (atom,), c in floors.items():
        x, k = atom.args
        bound = x if c < 0 else sub(x, k - 1)  # c * (x // k) >= c * bound / k
        relaxed = add(relaxed, mul(bound, c * (scale // k)))
    rlo, _ = bounds(relaxed)
    if rlo is None:
        return lo
    rlo = -(-rlo // scale)
    return rlo if lo is None else max(lo, rlo)


def compare(a: Dim, b: Dim) -> int | None:
    """Sign of a - b where it is provable for all positive symbol values, else None."""
    diff = sub(a, b)
    if not isinstance(diff, SymExpr):
        return (diff > 0) - (diff < 0)
    lo, neg_lo = _lower(diff), _lower(mul(diff, -1))
    if lo is not None and lo > 0:
        return 1
    if neg_lo is not None and neg_lo > 0:
        return -1
    return None


def equal(a: Dim, b: Dim) -> bool | None:
    """True / False where provable, None where it depends on the symbols' values."""
    c = compare(a, b)
    if c is None:
        return True if sub(a, b) == 0 else None
    return c == 0


def provably_le(a: Dim, b: Dim) -> bool:
    """a <= b for all positive symbol values."""
    lo = _lower(sub(b, a))
    return lo is not None and lo >= 0


def dim_min(a: Dim, b: Dim) -> Dim:
    if provably_le(a, b):
        return a
    if provably_le(b, a):
        return b
    return _extremum("min", a, b)


def dim_max(a: Dim, b: Dim) -> Dim:
    if provably_le(a, b):
        return b
    if provably_le(b, a):
        return a
    return _extremum("max", a, b)


def _extremum(kind: str, a: Dim, b: Dim) -> Dim:
    """min/max atom with the common constant outside: max(x - 1, 0) + 1 == max(x, 1)."""
    c = min(_terms(a).get((), 0), _terms(b).get((), 0))
    a, b = sub(a, c), sub(b, c)
    return add(SymExpr({(Atom(kind, tuple(sorted((a, b), key=str))),): 1}), c)


_APPLY = {"floordiv": lambda a, b: a // b, "min": min, "max": max}
_BUILD = {"floordiv": lambda a, b: floordiv(a, b), "min": dim_min, "max": dim_max}


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|.))")


def parse(text: str) -> Dim:
    """Parse `seq`, `seq + 1`, `2*seq - 3`, `batch*seq`, `(seq // 8)`, `min(seq, 4)` (the printer's format)."""
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
        if name in ("min", "max") and peek() is not None and peek()[2] == "(":
            pos += 1
            a = expr()
            if peek() is None or peek()[2] != ",":
                raise ValueError(f"missing ',' in {text!r}")
            pos += 1
            b = expr()
            if peek() is None or peek()[2] != ")":
                raise ValueError(f"missing ')' in {text!r}")
            pos += 1
            return dim_min(a, b) if name == "min" else dim_max(a, b)
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
        while peek() is not None and peek()[2] in ("*", "//"):
            op = peek()[2]
            pos += 1
            rhs = atom()
            if op == "*":
                v = mul(v, rhs)
                continue
            q = floordiv(v, rhs)
            if q is None:
                raise ValueError(f"{v} // {rhs} in {text!r}: only division by a positive integer")
            v = q
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
