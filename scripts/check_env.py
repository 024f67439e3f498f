"""The environment against the pinned stack.

    python scripts/check_env.py constraints.txt        exit 1, naming each difference, unless the running environment
                                                       holds exactly the file's versions (and nothing else)
    python scripts/check_env.py --requirement-names pyproject.toml
                                                       the project's dependency names (dev, lmeval, ct2 extras), no
                                                       versions: what `scripts/setup_env.sh VENV --latest` upgrades
    python scripts/check_env.py --freeze               the running environment as a constraints file body

A local version label (``torch==2.13.0+cpu``) matches its public version (``torch==2.13.0``): the CPU and CUDA
builds of one release are the same pin.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# Installed by the venv itself or the project's own editable install, never pinned.
UNPINNED = {"pip", "setuptools", "wheel", "trialign"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def read_constraints(path: Path) -> dict[str, str]:
    pins = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(match[1])] = match[2]
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in UNPINNED:
            found[canonical(name)] = public(dist.version)
    return found


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = [f"{name}: {have[name]} installed, {version} pinned" for name, version in sorted(pins.items())
           if name in have and have[name] != public(version)]
    out += [f"{name}: pinned at {pins[name]} but not installed" for name in sorted(set(pins) - set(have))]
    out += [f"{name}: {have[name]} installed but not pinned" for name in sorted(set(have) - set(pins))]
    return out


def requirement_names(pyproject: Path) -> list[str]:
    import tomllib

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    specs = project["dependencies"] + extras["dev"] + extras["lmeval"] + extras["ct2"]
    return [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?", spec)[0] for spec in specs]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--requirement-names"]:
        print(" ".join(requirement_names(Path(argv[1]))))
        return 0
    if argv[:1] == ["--freeze"]:
        print("\n".join(f"{name}=={version}" for name, version in sorted(installed().items())))
        return 0
    path = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "constraints.txt")
    problems = differences(read_constraints(path), installed())
    for problem in problems:
        print(f"check_env: {problem} ({path})", file=sys.stderr)
    if not problems:
        print(f"check_env: the environment holds exactly the versions of {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
