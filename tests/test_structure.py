"""The code's structure: no import cycles (imports inside functions included), no layer importing one above it,
no private name taken across modules, and tokensurgery importable on its own.

The layers, lowest first (README, Layout): each module may import its own layer and those below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("composer", "tokensurgery", "architectures")
LAYERS = [
    # foundations: no composer imports beyond these
    (
        "composer",
        "composer.errors",
        "composer.signals",
        "composer.cache",
        "composer.parallel",
        "composer.memory",
        "composer.files",
        "composer.safetensors_header",
        "composer.cpu",
        "composer.yaml_text",
        "composer.packages",
        "composer.chat_templates",
        "composer.cluster_address",
        "composer.progress",
    ),
    ("tokensurgery",),  # importable on its own: it imports nothing of composer
    ("composer.native",),
    ("composer.sources",),
    ("architectures", "composer.architecture", "composer.architecture_experts", "composer.output_rules"),
    ("composer.methods",),
    ("composer.recipe",),
    ("composer.plan",),
    ("composer.moe", "composer.recipe_files"),
    ("composer.execute",),
    ("composer.card", "composer.model_checks", "composer.provenance"),
    (
        "composer.compose",
        "composer.check",
        "composer.transplant",
        "composer.extract_lora",
        "composer.extract_expert",
        "composer.evaluate",
        "composer.route",
        "composer.bundled",
        "composer.trace",
        "composer.tune",
        "composer.export",
        "composer.calibration",
    ),
    ("composer.demo",),
    ("composer.cli",),
    ("composer.launch",),  # the `compose` entry point
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = ast.parse(path.read_text(), str(path))
    return found


def imports_of(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import anywhere in the module, in-function ones too."""
    found = []
    package = name if (ROOT / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [alias.name for alias in node.names]
            found += [
                (f"{base}.{n}", [], node.lineno) for n in names if f"{base}.{n}" in known
            ]  # `from package import module`
            taken = [n for n in names if f"{base}.{n}" not in known]
            if taken:
                found.append((base, taken, node.lineno))
    return [(module, names, line) for module, names, line in found if module.split(".")[0] in PACKAGES]


def owning(module: str, known: set[str]) -> str:
    """The module itself, or the package whose face (__init__) an import of a missing name goes through."""
    while module not in known and "." in module:
        module = module.rpartition(".")[0]
    return module


def layer_of(module: str) -> int:
    best, depth = None, -1
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = number, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's Layout)"
    return best


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    trees = modules()
    known = set(trees)
    return {
        name: [(owning(m, known), names, line) for m, names, line in imports_of(name, tree, known)]
        for name, tree in trees.items()
    }


def test_no_import_cycles():
    edges = {name: {m for m, _, _ in imported if m != name} for name, imported in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_no_layer_imports_a_higher_one():
    upward = []
    for name, imported in graph().items():
        for module, _, line in imported:
            if layer_of(module) > layer_of(name):
                upward.append(f"{name}:{line} imports {module}")
    assert upward == [], "\n".join(upward)


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for name, imported in graph().items():
        for module, names, line in imported:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != name:
                crossing.append(f"{name}:{line} takes {', '.join(private)} from {module}")
    assert crossing == [], "\n".join(crossing)


def test_tokensurgery_imports_nothing_of_composer():
    leaks = [
        f"{name}:{line} imports {module}"
        for name, imported in graph().items()
        if name.startswith("tokensurgery")
        for module, _, line in imported
        if not module.startswith("tokensurgery")
    ]
    assert leaks == [], "\n".join(leaks)
