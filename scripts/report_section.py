"""Print one split's tables and verdicts from a report.md, as the README copies them.

    .venv/bin/python scripts/report_section.py runs/experiment/seeds/report.md main

Everything of the section ``## Split: <split>`` up to its plot (the results table, the paired differences, the pooled
differences where a method has replicas, the verdicts, the tables after a challenge turn), unchanged, so a README
table is the report's own text.
"""

from __future__ import annotations

import sys
from pathlib import Path


def section(markdown: str, split: str) -> str:
    marker = f"## Split: {split}\n"
    if marker not in markdown:
        raise SystemExit(f"report_section: no split {split!r} in the report")
    body = markdown.split(marker, 1)[1].split("\n## ", 1)[0]
    return body.split("\n![", 1)[0].strip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    sys.stdout.write(section(Path(argv[0]).read_text(encoding="utf-8"), argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
