"""The layering holds by construction: no module imports a higher layer, and no two modules import
each other (directly or round a longer loop).

Every import statement of every module in peftkit/ counts, the lazy ones inside functions and
those under ``TYPE_CHECKING`` included: a lazy upward import is still a dependency, only a later
one. Read from the source (AST), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "peftkit"

# Top to bottom. A name is a module (``train`` = peftkit/train.py) or a package, whose every module
# is in the package's layer (``tasks`` = peftkit/tasks/*). Within a layer imports are free, as long
# as they make no cycle.
LAYERS: dict[int, tuple[str, ...]] = {
    5: ("cli", "cli_spec", "cli_errors", "cli_output"),
    4: ("api",),
    3: (
        "benchmark",
        "planner",
        "runs",
        "train",
        "loop",
        "inference",
        "evaluation",
        "tuning",
        "exporter",
        "gguf_export",
        "gguf_check",
        "gguf_lora",
        "openvino_export",
        "recommendation",
    ),
    2: ("tasks", "strategies", "registry", "levers"),
    1: (
        "data",
        "config",
        "adapter_io",
        "models",
        "structure",
        "memory",
        "deferred_compile",
        "env",
        "errors",
        "typing_utils",
        "fingerprint",
        "gguf_convert",
        "gguf_vocab",
        "gguf_pretokenizers",
        "llamacpp",
        "onnx_graph",
        "export_gate",
        "rundir",
        "checkpoint",
        "plots",
        "metrics",
        "durations",
        "workers",
        "spec",
        "files",
        "predict_io",
        "inputs",
        "hub",
        "stats",
        "sharding",
        "chunked_loss",
        "packing",
        "kernels",
        "settings",
        "export_config",
    ),
}
LAYER_NAMES = {
    5: "command line",
    4: "library API",
    3: "runs, benches, plans",
    2: "tasks and strategies",
    1: "data, io, structure",
}
# the package's front doors: importing peftkit (or running it) may pull anything in
EXEMPT = {"peftkit", "peftkit.__main__"}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = PACKAGE.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported peftkit module, line) for every import statement in ``path``, wherever it is."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import registry`` imports the module registry; ``from .tasks import get_task`` the package
            names = [f"{target}.{alias.name}" for alias in node.names]
            found += [(n, node.lineno) if _is_module(n) else (target, node.lineno) for n in names]
    return [(name, line) for name, line in found if name.startswith("peftkit.") and name not in EXEMPT]


def _layer(module: str) -> int | None:
    return LAYER_OF.get(module.split(".")[1]) if module.count(".") else None


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in MODULES if name not in EXEMPT and _layer(name) is None]
    assert not unplaced, f"modules missing from the layer map in tests/test_layering.py: {unplaced}"


def _where(module: str) -> str:
    layer = _layer(module)
    return f"{module} (layer {layer}: {LAYER_NAMES.get(layer, '?')})"


@pytest.mark.parametrize("module", [m for m in MODULES if m not in EXEMPT])
def test_no_module_imports_a_higher_layer(module: str) -> None:
    mine = _layer(module)
    upward = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {_where(module)} imports {_where(target)}"
        for target, line in GRAPH[module]
        if (_layer(target) or 0) > (mine or 0)
    ]
    assert not upward, "nothing may import a higher layer:\n" + "\n".join(upward)


def _cycle() -> list[str] | None:
    """One import cycle between modules (as the path round it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target, _ in GRAPH.get(node, []):
            if target == node:
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for name in GRAPH:
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_lazy_imports() -> None:
    """The walk finds an import inside a function body (what a lazy upward import looks like)."""
    lazy = {target for target, _ in GRAPH["peftkit.cli"]}
    assert "peftkit.api" in lazy and "peftkit.config" in lazy  # both imported inside functions only


DOC = PACKAGE.parent / "docs" / "architecture.md"


def test_the_architecture_doc_shows_this_layer_map() -> None:
    """docs/architecture.md's layer table names each layer's modules as ``LAYERS`` does."""
    import re

    rows = re.findall(r"^\| (\d) \| ([^|`]+) \| ([^|]+) \|$", DOC.read_text(encoding="utf-8"), re.M)
    documented = {int(layer): (name.strip(), re.findall(r"`([^`]+)`", modules)) for layer, name, modules in rows}
    assert documented == {layer: (LAYER_NAMES[layer], list(names)) for layer, names in LAYERS.items()}


def test_the_architecture_doc_call_path_names_real_functions() -> None:
    """Every hop of the documented ``peftkit run`` path (``peftkit/FILE.py:function`` or
    ``:Class.method``) is defined where it says, so the path cannot go stale silently."""
    import re

    hops = re.findall(r"^\| \d+ \| `peftkit/([\w/]+)\.py:([\w.]+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    assert len(hops) >= 8
    for module, qualname in hops:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        scope: list[ast.stmt] = tree.body
        for part in qualname.split("."):
            node = next((n for n in scope if getattr(n, "name", None) == part), None)
            assert node is not None, f"docs/architecture.md: {module}.py has no {qualname}"
            scope = getattr(node, "body", [])
