"""The layer rule of ARCHITECTURE.md, enforced by import-linter (the contracts live in
pyproject.toml): the contracts hold on this tree, and a deliberately wrong import breaks them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root / 'platform'}{os.pathsep}{root}"}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("platform", "catalog", "serving"):
        shutil.copytree(ROOT / part, dst / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("room, line, contract", [
    ("model", "import ray\n", "the math never imports the cluster"),
    ("learning", "from fewshot.backends import registry\n", "fewshot rooms: data and imports flow one way"),
    ("clip", "import mlflow\n", "the math never imports the cluster"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, room, line, contract):
    root = _copy_tree(tmp_path)
    (root / "platform" / "fewshot" / room / "_wrong.py").write_text(line)
    proc = _lint(root)
    assert proc.returncode != 0
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout
    assert f"fewshot.{room}._wrong" in proc.stdout


def test_every_room_is_packaged():
    """A non-editable install (the Docker image) gets exactly the packages pyproject lists."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    rooms = {"fewshot" + ("." + ".".join(p.parent.relative_to(ROOT / "platform" / "fewshot").parts)
                          if p.parent != ROOT / "platform" / "fewshot" else "")
             for p in (ROOT / "platform" / "fewshot").rglob("__init__.py")}
    assert rooms <= listed, sorted(rooms - listed)
