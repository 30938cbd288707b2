"""The README's file map and the docs' links must match the tree (no line counts: they pin every edit)."""

import re

from conftest import ROOT


def file_map() -> list[str]:
    """The file names of the README's file map, in reading order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M)
    return [name for row in rows for name in re.findall(r"`([\w./]+)`", row)]


def test_file_map_names_every_runtime_file_and_nothing_else():
    names = file_map()
    runtime = {p.name for p in ROOT.glob("*.py")}
    assert runtime <= set(names), (
        f"runtime files missing from the README's file map: {sorted(runtime - set(names))}"
    )
    missing = [name for name in names if not (ROOT / name.rstrip("/")).exists()]
    assert not missing, f"the README's file map names files that do not exist: {missing}"


def test_reading_order_starts_with_the_model():
    assert file_map()[0] == "ola.py"


def test_relative_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
