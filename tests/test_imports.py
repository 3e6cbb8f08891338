"""Dependencies point one way: no import cycle among vattention's modules, and every top-level
subpackage imports on its own in a fresh interpreter (vattention.memory with nothing but torch).

The graph is read from the source with `ast`, imports inside functions included (a cycle closed
at call time is still a cycle); `if TYPE_CHECKING:` blocks are left out, since they never run.
  from .x import y    an edge to module x, and to x.y where x.y is a module
  from . import y     an edge to y where it is a module, else to the package (a name its __init__ defines)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SUBPACKAGES = ["vattention.memory", "vattention.kv", "vattention.attention", "vattention.engine",
               "vattention.server"]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py under root/package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, outside `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # relative imports count from the package a module is in (a package's own for __init__)
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            targets |= submodules
            if node.module is not None or len(submodules) < len(node.names):
                targets.add(base)
        graph[name] = (targets & modules.keys()) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}  # visit order
    low: dict[str, int] = {}  # the earliest visit reachable from the module's subtree
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: it is v and all above it on the stack
            component = set(stack[stack.index(v):])
            del stack[stack.index(v):]
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_through(graph, c) for c in components)


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle from the component's first module back to itself, inside it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def test_cycle_finder_sees_cycles_closed_inside_functions(tmp_path):
    """The finder itself, on a package with two known cycles and one that only TYPE_CHECKING closes."""
    files = {"__init__.py": "",
             "a.py": "from .b import f\n",
             "b.py": "def f():\n    from . import a\n",  # a -> b -> a, closed at call time
             "c.py": "from .sub import d\n",  # c -> pkg.sub and c -> pkg.sub.d
             "sub/__init__.py": "",
             "sub/d.py": "from .. import c\n",  # pkg.sub.d -> c
             "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import g\n",
             "f.py": "from .e import TYPE_CHECKING\nimport os\n"}
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.d"} and graph["pkg.e"] == set()
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.d", "pkg.c"]]


def test_no_import_cycle_among_vattention_modules():
    graph = import_graph(SRC, "vattention")
    assert len(graph) > 50 and graph["vattention.kv.paged"] >= {"vattention.attention", "vattention.kv.base"}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_each_subpackage_imports_alone_in_a_fresh_interpreter():
    failures = []
    for package in SUBPACKAGES:
        done = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True)
        if done.returncode:
            failures.append(f"import {package}:\n{done.stderr.strip()}")
    assert not failures, "\n\n".join(failures)


def test_memory_needs_nothing_but_torch():
    """Importing vattention.memory after torch loads no other third-party module, and nothing
    from the rest of vattention but its top-level package."""
    script = textwrap.dedent("""
        import sys
        import torch
        before = set(sys.modules)
        import vattention.memory
        new = set(sys.modules) - before
        print(sorted({m.split(".")[0] for m in new} - set(sys.stdlib_module_names)))
        print(sorted(m for m in new if m.startswith("vattention.") and not m.startswith("vattention.memory")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    top_level, other_vattention = done.stdout.splitlines()
    assert top_level == "['vattention']", f"vattention.memory pulled in {top_level}"
    # vattention/__init__.py imports these two (plain dataclasses) when it is first imported
    allowed = ("[]", "['vattention.outputs', 'vattention.sampling_params']")
    assert other_vattention in allowed, f"vattention.memory pulled in {other_vattention}"
