"""The seed 002 port stays a small diff of the seed's own main.py (kept verbatim beside it)."""

import difflib

from conftest import REPO

SEED002 = REPO / "examples/python/seed002"


def test_the_seed002_port_changes_at_most_ten_lines():
    seed = (SEED002 / "seed_main.py").read_text().splitlines()
    port = (SEED002 / "main.py").read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(seed, port, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert 0 < len(changed) <= 10, "\n".join(changed)
