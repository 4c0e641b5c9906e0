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
    (seq, 2, None),                 # not a polynomial
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
    assert s.dim_min(seq, 4) is None


def test_evaluate_and_unbound_symbol():
    assert (batch * seq + 3).evaluate({"batch": 2, "seq": 5}) == 13
    with pytest.raises(KeyError, match="seq"):
        (seq + 1).evaluate({})
