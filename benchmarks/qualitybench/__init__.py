"""The pieces of benchmarks/quality.py (the entry point): tasks.py (the tasks), build.py (tokenizer, teacher, student
init, collected records, scoring), reference.py (the plain reference loops), runs.py (imitate runs as modes), modes.py
(MODES: every mode by name), teams.py (teams of teachers, selection, TAKD), report.py (the printed table).

A new task is an entry in tasks.TASKS; a new mode an entry in modes.MODES, or a file of modes registered there as
teams.py is."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the demo's chat template, special tokens and model builder
