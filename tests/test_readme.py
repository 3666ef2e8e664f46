"""The README stays true: its test command is what CI runs, its CLI table names every command."""

import os
import re

from megajoy.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in _read(".ci", "run").splitlines() if "pytest" in line]
    assert len(ci_commands) == 1
    assert ci_commands[0].strip() in _read("README.md")


def test_ci_installs_cpu_torch_first():
    lines = [line for line in _read(".ci", "run").splitlines() if "pip install" in line]
    assert "torch==2.13.0" in lines[0]


def test_readme_documents_every_command():
    readme = _read("README.md")
    for name in COMMANDS:
        assert re.search(rf"`megajoy {name}\b", readme), name
