"""Write infra/requirements-runtime.txt: the project's dependencies, pinned as in constraints.txt.

    python infra/requirements.py           # rewrite the file
    python infra/requirements.py --check   # exit 1 if the committed file is stale

Generated, do not edit (the tests check it is current). It names what a job needs besides Ray itself (the cluster provides Ray: a job must never
install another Ray version), each pinned to the version constraints.txt resolved. The
runtime env (infra/runtime_env.yaml, ``pip:``) and the image (infra/docker/Dockerfile)
install from it, so a job finds the same versions on every node.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "infra" / "requirements-runtime.txt"
EXTRAS = ("cluster",)  # optional dependency groups a cluster needs too
PROVIDED = {"ray"}     # what the cluster brings; never installed by a job


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].strip()


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_canon(name)] = version.strip()
    return out


def render() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    versions = pins()
    lines, seen = [], set()
    for req in reqs:
        name = _name(req)
        key = _canon(name)
        if key in PROVIDED or key in seen:
            continue
        if key not in versions:
            raise SystemExit(f"{name} (pyproject.toml) has no pin in constraints.txt")
        extras = re.match(r"[^\[]*(\[[^\]]*\])?", req).group(1) or ""
        lines.append(f"{name}{extras}=={versions[key]}")
        seen.add(key)
    # no comment lines: Ray's runtime env reads the file as a plain list of requirements
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale; run python infra/requirements.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
