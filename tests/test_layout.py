"""The house rules of dxray/'s layout, read from the source (ast, nothing imported):

- the core loaders know no presets: generator, classifiers and segment never import dxray.models,
  dxray.toyworld or the tiny builders, not even inside a function;
- no module imports another module's private names;
- the module-level imports of dxray/ form no cycle;
- every import, at module level or inside a function, points down :data:`LAYERS` (the README's "Where things
  live"), and the imports within a layer, lazy ones included, form no cycle.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dxray"
CORE_LOADERS = ("generator", "classifiers", "segment")

# Bottom to top, as in the README's "Where things live": a module imports only from its own layer or those below.
# A pattern names a module or a package (and all inside it); the longest match decides.
LAYERS = [
    ("base", ["dxray.errors", "dxray.quiet", "dxray.progress", "dxray.storage.masking"]),  # masking: config fills it
    ("config", ["dxray.config", "dxray.identity"]),
    ("storage", ["dxray.storage"]),
    ("core", ["dxray.objectives", "dxray.prompts", "dxray.weights", "dxray.generator", "dxray.classifiers",
              "dxray.segment", "dxray.optimize", "dxray.features", "dxray.verdict", "dxray.cache"]),
    ("worlds", ["dxray.toyworld"]),
    ("models", ["dxray.models"]),
    ("runs", ["dxray.runs"]),
    ("pipeline", ["dxray.pipeline"]),
    ("distributed", ["dxray.distributed"]),
    ("readers", ["dxray.report", "dxray.agreement", "dxray.compare", "dxray.plan_estimate", "dxray.flops",
                 "dxray.contract", "dxray.toyworld.check", "dxray.toyworld.scores"]),
    ("entry", ["dxray", "dxray.cli", "dxray.__main__"]),
]


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


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    """A depth-first walk that fails on the first cycle, naming it."""
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
    _assert_acyclic(graph)
    assert len(graph) > 40  # the walk saw the package


def _layer(module: str) -> int:
    best = max(((len(p), i) for i, (_, patterns) in enumerate(LAYERS) for p in patterns
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to the README's 'Where things live'"
    return best[1]


def _edges() -> dict[str, set[str]]:
    """Every module's dxray imports, lazy ones included: ``from dxray import prompts`` is dxray.prompts; a package
    imported for a submodule is not an edge of its own (Python runs its __init__, which is checked by itself)."""
    modules = {_module(p): p for p in _files()}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(path, top_level_only=False):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            for target in subs or ([module] if module in modules else []):
                if target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def test_every_import_points_down_the_layers():
    graph = _edges()
    up = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
          for a, deps in sorted(graph.items()) for b in sorted(deps) if _layer(b) > _layer(a)]
    assert not up, "\n".join(up)


def test_the_imports_within_a_layer_form_no_cycle_even_lazily():
    graph = _edges()
    _assert_acyclic({a: {b for b in deps if _layer(b) == _layer(a)} for a, deps in graph.items()})


def _path(pattern: str) -> str:
    """A layer's pattern as the README writes it: ``storage/``, ``storage/masking.py``, ``__init__.py``."""
    rel = pattern.removeprefix("dxray").removeprefix(".").replace(".", "/")
    if not rel:
        return "__init__.py"
    return f"{rel}/" if (PACKAGE / rel).is_dir() else f"{rel}.py"


def test_the_readme_names_every_layer_in_order():
    """The README's "Where things live" has one row per layer, bottom first, naming exactly the layer's modules."""
    import re

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Where things live"):]
    table = table[:table.index("\n## ", 5)]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ") and "`" in line.split("|")[1]]
    assert [set(re.findall(r"`([^`]+)`", r)) for r in rows] == [{_path(p) for p in patterns} for _, patterns in LAYERS]
