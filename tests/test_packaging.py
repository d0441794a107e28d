"""Packaging: every package is in the wheel, and shipped files are found through importlib.resources.

The full wheel install (build, fresh venv, collect / clean / demo from outside the repository) is .ci/wheel_check.sh.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_is_listed_for_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "imitate").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapped == {"imitate._prompts": "prompts", "imitate._data": "data"}
    assert (ROOT / "imitate" / "py.typed").is_file()


def test_shipped_files_are_package_resources():
    from imitate.clean.filters import DEFAULT_REFUSALS
    from imitate.collect.selfinstruct import DEFAULT_SEEDS
    from imitate.collect.templates import builtin_names, load
    from imitate.resources import data_file, prompts_dir

    for pkg, folder in (("imitate._prompts", "prompts"), ("imitate._data", "data")):
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and Path(spec.origin).parent == ROOT / folder  # this checkout's editable install
    assert prompts_dir() == ROOT / "prompts" and data_file("refusals.txt") == ROOT / "data" / "refusals.txt"
    assert DEFAULT_REFUSALS.is_file() and DEFAULT_SEEDS.is_file()
    assert {"chat", "default", "instruction", "self_instruct"} <= set(builtin_names())
    assert load("chat").render({"prompt": "hi"})[-1] == {"role": "user", "content": "hi"}
    for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["imitate._data"]:
        assert (ROOT / "data" / pattern).is_file()  # the data files named for the wheel exist
