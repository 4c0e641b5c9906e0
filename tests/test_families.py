"""The corpus's family table: README.md shows exactly what tests/families.py makes the tests assert."""
from __future__ import annotations

from pathlib import Path

from . import families
from .real_models import corpus

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_holds_the_family_table():
    """Regenerate with `python -m polyport.tests.families` after changing the corpus or GAPS."""
    assert families.table() in README.read_text(), "README.md's family table is stale"


def test_the_corpus_covers_fifteen_families_moe_first():
    entries = corpus().values()
    assert len({e["family"] for e in entries}) >= 15
    assert len({e["family"] for e in entries if e["num_moe_layers"]}) >= 10


def test_every_gap_names_an_export_and_a_check():
    for (name, check), what in families.GAPS.items():
        assert name in corpus() and check in families.CHECKS, (name, check)
        if check in ("attention", "moe"):
            count, reason = what
            op = "polyport::Attention" if check == "attention" else "polyport::MoE"
            assert 0 <= count < families.expected(corpus()[name])[op] and reason
        else:
            assert isinstance(what, str) and what
