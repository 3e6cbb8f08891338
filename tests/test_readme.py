"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```(?:bash)?\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Set up' section with a code block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_gives_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert "vattention" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci, "the .ci/run test command differs from the README's"
