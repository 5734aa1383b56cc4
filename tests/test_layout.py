"""The house rules of dxray/'s layout, read from the source (ast, nothing imported):

- the core loaders know no presets: generator, classifiers and segment never import dxray.models,
  dxray.toyworld or the tiny builders, not even inside a function;
- no module imports another module's private names;
- the module-level imports of dxray/ form no cycle.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dxray"
CORE_LOADERS = ("generator", "classifiers", "segment")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names) for each import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks and try/except at module level count too
        nodes = [n for top in tree.body for n in ([top] if isinstance(top, ast.Import | ast.ImportFrom)
                                                  else ast.walk(top) if isinstance(top, ast.If | ast.Try) else [])]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                pkg = _module(path).split(".")
                pkg = pkg[:len(pkg) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def test_core_loaders_import_no_presets():
    for name in CORE_LOADERS:
        for module, names in _imports(PACKAGE / f"{name}.py", top_level_only=False):
            targets = [module] + [f"{module}.{n}" for n in names]
            assert not any(t.startswith(("dxray.models", "dxray.toyworld", "dxray.tiny")) for t in targets), (name, module)


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _files():
        for module, names in _imports(path, top_level_only=False):
            if module.startswith("dxray") and module != _module(path):
                found += [f"{_module(path)}: from {module} import {n}" for n in names if n.startswith("_")]
    assert not found


def test_module_level_imports_form_no_cycle():
    modules = {_module(p): p for p in _files()}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(path, top_level_only=True):
            for target in [f"{module}.{n}" for n in names] + [module]:
                if target in modules and target != name:
                    deps.add(target)
                    break
        graph[name] = deps
    # Importing a submodule imports its packages first; only dxray's own edges matter here.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack[stack.index(d):] + [d])
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 40  # the walk saw the package
