"""What a non-editable install of the project holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prefast", "store")


def test_a_wheel_holds_every_module_and_the_typing_markers(tmp_path):
    """A wheel built from the project holds every module of both packages and their
    ``py.typed`` markers (PEP 561), without which a user's type checker takes prefast and
    store as untyped. Built from a copy, so the checkout gains no build folders."""
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    r = subprocess.run(
        [*cmd, "--no-index", str(src), "-w", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("prefast-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    for name in PACKAGES:
        expected = {p.relative_to(src).as_posix() for p in (src / name).rglob("*.py")}
        assert expected and expected <= held, sorted(expected - held)
        assert f"{name}/py.typed" in held
