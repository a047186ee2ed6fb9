"""The package layout holds: packages import only from the layers below them, there is no import
cycle, only the action spaces ask which action mode runs, and the project installs without torch
at build time (pip's build isolation)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import from its own layer and the layers before it.
LAYERS = ["ml.config", "ml.data", "ml.market", "ml.env", "ml.fastpath", "ml.agent", "ml.evaluation",
          "ml.serving", "ml.release", "ml.service", "ml.forward", "ml.pipeline", "ml.tuning",
          "ml.orchestration", "ml.cli"]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def ml_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported ml module, line, at module top) for every import of an ``ml`` module in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ml":
            names = [node.module] if node.module != "ml" else [f"ml.{a.name}" for a in node.names]
            found += [(name, node.lineno, id(node) in top) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.split(".")[0] == "ml"]
    return found


def layer(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add its package to LAYERS"
    return matches[0]


def sources() -> list[Path]:
    return sorted(p for p in (ROOT / "ml").rglob("*.py"))


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in sources():
        here = module_name(path)
        if here == "ml" or here == "ml.__main__":
            continue
        for imported, line, _ in ml_imports(path):
            if imported != "ml" and layer(imported) > layer(here):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    modules = {module_name(p): p for p in sources()}
    graph = {name: {m for m, _, _ in ml_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_ml_modules_import_ml_at_the_top():
    # The CLI imports each command's modules when it runs, so `serve` never loads torch.
    inside = [f"{p.relative_to(ROOT)}:{line} {m}" for p in sources() if module_name(p) != "ml.cli"
              for m, line, top in ml_imports(p) if not top]
    assert not inside, "ml imports inside functions:\n" + "\n".join(inside)


def test_only_the_action_spaces_and_the_config_check_ask_for_the_mode():
    asking = subprocess.run(["git", "grep", "-n", r"config.portfolio\|mode ==", "--", "ml/"], cwd=ROOT,
                            capture_output=True, text=True).stdout.splitlines()
    assert asking and all(line.startswith(("ml/env/action_space.py:", "ml/config.py:")) for line in asking), asking


def test_setup_builds_without_torch_and_skips_the_kernel():
    # pip's build isolation runs setup.py in an environment without torch.
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "always"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "rltrade"
    assert "is not built" in done.stderr
