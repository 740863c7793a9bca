"""The layout's rules (docs/architecture.md), checked on the source: no import circles, no import
that runs up a layer (lazy ones included), no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dpokit"

# Bottom to top, as docs/architecture.md draws them; a module may import only from its own layer or below.
LAYERS = [
    {"version", "inputs", "openmp"},
    {"losses"},
    {"config"},
    {"data"},
    {
        "models",
        "sharding",
        "cpu_threads",
        "logprobs",
        "packed_attention",
        "generation",
        "optimizers",
        "tiny",
        "tiny_vision",
        "tiled_mlp",
        "model_source",
        "model_shape",
    },
    {"reference", "detectors", "mitigations", "demo"},
    {"steps"},
    {"ref_cache"},
    {"report"},
    {"training"},
    {"online", "doctor", "plan"},
    {"cli", "commands", "robustness"},
    {"__init__", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("dpokit",) + path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)}, every import statement (lazy ones too)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(alias.name, None) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add((sub, None) if sub in modules else (base, alias.name))
        targets = set()
        for target, imported in found:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target.startswith("dpokit") and target != name:
                targets.add((target, imported))
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if head in names)


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if not any((m.split(".") + ["__init__"])[1] in names for names in LAYERS)]
    assert not unplaced, f"add these to LAYERS and to docs/architecture.md: {unplaced}"


def test_no_import_runs_up_a_layer():
    graph = _imports(_modules())
    upward = sorted((m, t) for m, targets in graph.items() for t, _ in targets if _layer(t) > _layer(m))
    assert not upward, upward


def test_no_import_circles():
    graph = {m: {t for t, _ in targets} for m, targets in _imports(_modules()).items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_no_private_name_is_imported_across_modules():
    private = sorted(
        (m, t, n)
        for m, targets in _imports(_modules()).items()
        for t, n in targets
        if n and n.startswith("_") and not n.startswith("__")
    )
    assert not private, private


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


# Data tables written as code, exempt from the 60-line rule: each entry names why.
LONG_TABLES = {("online/suites/ifeval_data.py", "_instruction"): "one branch per IFEval instruction kind (23 kinds)"}


def test_no_function_is_over_60_lines_outside_data_tables():
    long = {}
    for path in SRC.rglob("*.py"):
        where = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (where, node.name) not in LONG_TABLES:
                if (n := node.end_lineno - node.lineno + 1) > 60:
                    long[f"{where}:{node.lineno} {node.name}"] = n
    assert not long, long
