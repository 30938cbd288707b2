"""The README's file map states each runtime file's line count: they must be the files' real counts."""

import re

from conftest import ROOT


def test_file_map_line_counts_are_current():
    rows = re.findall(r"^\| `([\w./]+\.py)` \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) >= 15
    for name, stated in rows:
        actual = len((ROOT / name).read_text().splitlines())
        assert actual == int(stated), f"README says {name} has {stated} lines, it has {actual}"
    listed = {name for name, _ in rows}
    runtime = {p.name for p in ROOT.glob("*.py")}
    assert runtime <= listed, f"runtime files missing from the README's file map: {sorted(runtime - listed)}"
