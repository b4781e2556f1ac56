"""The README's family table is the one rendered from what the family tests check."""

from family_matrix import README, readme_table, render_table


def test_readme_family_table_matches_the_tests():
    assert readme_table(README.read_text()) == render_table(), (
        "README family table is stale: run `python tests/families/family_matrix.py --write`")
