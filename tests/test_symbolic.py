import pytest

from polyport.ir import symbolic as s
from polyport.ir.symbolic import sym

seq, batch = sym("seq"), sym("batch")


def test_arithmetic_normalises_to_int_when_symbols_cancel():
    assert (seq + 1) - seq == 1
    assert isinstance((seq + 1) - seq, int)
    assert 2 * seq - seq == seq


def test_printing_is_stable_and_parses_back():
    for e in (seq + 1, 2 * seq - 3, batch * seq + seq, -seq + 4):
        assert s.parse(str(e)) == e
    assert str(batch * seq + 2 * seq - 3) == "batch*seq + 2*seq - 3"


@pytest.mark.parametrize("a,b,want", [
    (2 * seq, 2, seq),
    (2 * seq + 1, 2, seq),          # floor of the constant part
    (batch * seq, seq, batch),
    (seq, 2, s.parse("(seq // 2)")),  # not a polynomial: a floor-division atom
    (seq + 1, seq, None),
])
def test_floordiv(a, b, want):
    assert s.floordiv(a, b) == want


def test_comparisons_are_proved_for_positive_symbols_only():
    assert s.compare(seq + 1, seq) == 1
    assert s.compare(seq, 1) is None        # seq may be 1
    assert s.equal(seq + 1, 1) is False     # seq >= 1
    assert s.equal(seq, seq) is True
    assert s.dim_max(seq, seq + 2) == seq + 2
    assert str(s.dim_min(seq, 4)) == "min(4, seq)"  # undecided: an atom


def test_evaluate_and_unbound_symbol():
    assert (batch * seq + 3).evaluate({"batch": 2, "seq": 5}) == 13
    with pytest.raises(KeyError, match="seq"):
        (seq + 1).evaluate({})


def test_floordiv_atoms_normalise_and_parse_back():
    rate8 = seq // 8
    assert str(rate8) == "(seq // 8)"
    assert (8 * seq + 9) // 8 == seq + 1                   # exact parts leave the floor
    assert (seq + 9) // 8 == (seq + 1) // 8 + 1
    assert str((seq + 1) // 8) == "((seq + 1) // 8)"
    assert (seq // 8) // 2 == seq // 16                     # nested floors merge
    assert s.mod(seq, 8) == seq - 8 * rate8
    for e in (rate8, 2 * rate8 + 1, (seq + 3) // 4, s.dim_min(seq, 16), s.dim_max(seq // 4, 2) + seq):
        assert s.parse(str(e)) == e
    with pytest.raises(ValueError, match="positive integer"):
        s.parse("seq // batch")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 57, 300])
def test_atoms_evaluate_like_python(n):
    b = {"seq": n}
    assert (seq // 8).evaluate(b) == n // 8
    assert ((seq + 3) // 4 - 1).evaluate(b) == (n + 3) // 4 - 1
    assert s.mod(seq + 5, 4).evaluate(b) == (n + 5) % 4
    assert s.dim_min(seq, 16).evaluate(b) == min(n, 16)
    assert s.dim_max(seq // 4, 2).evaluate(b) == max(n // 4, 2)
    assert (seq // 8).substitute({"seq": n}) == n // 8


def test_bounds_of_atoms_are_sound():
    rate8 = seq // 8
    assert s.compare(rate8, 0) is None                      # seq // 8 is 0 for seq < 8
    assert s.provably_le(0, rate8) and s.provably_le(rate8, seq)
    assert s.compare(rate8 + 1, 0) == 1
    assert s.provably_le(s.dim_min(seq, 16), 16)
    assert s.dim_min(s.dim_min(seq, 16), 16) == s.dim_min(seq, 16)
    assert s.provably_le(s.dim_max(seq, 4), seq) is False
    assert (seq // 8).symbols == {"seq"}


def test_extrema_simplify():
    rate4 = seq // 4
    assert s.dim_max(rate4 - 1, 0) + 1 == s.dim_max(rate4, 1)      # constants leave the atom
    assert s.dim_min(rate4, s.dim_max(rate4 - 1, 0) + 1) == rate4   # x <= max(x, 1)
    assert s.dim_max(seq, s.dim_min(seq, 4)) == seq
