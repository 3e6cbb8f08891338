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


def test_the_memory_library_snippet_runs():
    """The README's memory-library example, on the host driver with the GPU's 2 MiB pages (so
    units hold 16 tokens, as on the H200) and a small slot count and budget."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("from vattention.memory import KVCacheSpec, VirtualKVCache")
    code = readme[start:readme.index("```", start)]
    for old, new in (('device="cuda", memory_budget_bytes=40 << 30',
                      'device="cpu", page_size=2 << 20, memory_budget_bytes=1 << 30'),
                     ("max_seqs=256, max_seq_len=32768", "max_seqs=4, max_seq_len=4096")):
        assert old in code, old
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile("import torch\n" + code, "README.md", "exec"), scope)
    assert scope["ok"] and scope["again"] == scope["slot"]  # the slot mapping u, reused as it is
