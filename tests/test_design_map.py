"""docs/DESIGN.md's module map names every Python file of the package, and only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_module_map_matches_the_tree():
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    named = set()
    for line in block.splitlines():
        path = line.split()[0] if line.strip() else ""
        match = re.fullmatch(r"(trialign/(?:[a-z_]+/)*)\{([a-z0-9_,]+)\}\.py", path)
        if match:
            named |= {f"{match[1]}{name}.py" for name in match[2].split(",")}
        elif path.endswith(".py"):
            named.add(path)
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "trialign").rglob("*.py") if p.name != "__init__.py"}
    assert named == files, {"missing from the map": sorted(files - named), "not in the tree": sorted(named - files)}
