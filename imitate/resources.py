"""Files shipped with imitate, found through importlib.resources (so a wheel or pipx install finds them too).

The repository keeps them at the top level, where users see and edit them; the build maps those directories into the
package (pyproject.toml `package-dir`): `prompts/` is `imitate._prompts` (built-in templates), `data/` is
`imitate._data` (only refusals.txt and seed_tasks.jsonl are packaged; the demo models stay in the repository).
Editable installs map them the same way, so there is one lookup for every kind of install.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def prompts_dir() -> Path:
    """The directory of the built-in prompt templates (NAME.j2)."""
    return Path(str(files("imitate._prompts")))  # installs are unpacked (never zipped): a real directory


def data_file(name: str) -> Path:
    """A default data file shipped with imitate, e.g. data_file("refusals.txt")."""
    return Path(str(files("imitate._data") / name))
