"""Import discipline (issue 31 item 8): peftkit's modules import each other at the top; an import
inside a function is there only to put off a heavy library.

A module is *heavy* when importing it loads a heavy library (torch, transformers, ...): it imports
one at its top, or at its top imports a heavy peftkit module (its packages' ``__init__`` included).
Then, for every module:

- a function-level import of a *light* peftkit module belongs at the top (putting it off saves
  nothing), unless ``ALLOWED`` says why not;
- a function-level import never repeats one the module already makes at its top;
- no private name (``_x``) is imported from another peftkit module;
- any other library not in ``HEAVY_LIBRARIES`` (the standard library, yaml, click, packaging) is
  imported at the top too, unless ``ALLOWED_LIBRARIES`` says why not: importing one costs little,
  and a function that imports it only hides what the module uses.

Read from the source (AST), so nothing is imported to check it. Imports under ``TYPE_CHECKING``
load nothing and do not count.
"""

from __future__ import annotations

import ast
import functools
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "peftkit"

HEAVY_LIBRARIES = {
    "torch",
    "transformers",
    "datasets",
    "peft",
    "accelerate",
    "optuna",
    "bitsandbytes",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx_ir",
    "openvino",
    "nncf",
    "gguf",
    "sklearn",
    "scipy",
    "numpy",
    "safetensors",
    "PIL",
    "huggingface_hub",
    "mlxtend",
    "liger_kernel",
    "sqlalchemy",
    "tqdm",
    "xllamacpp",
}

_ENTRY = (
    "keeps `peftkit --help` and `peftkit list` from loading the run machinery (the CLI imports cli_output at its top)"
)
# (importing module, imported module): why the import stays inside a function
ALLOWED: dict[tuple[str, str], str] = {
    ("peftkit.cli", "peftkit.api"): _ENTRY + ": api imports every command's modules",
    ("peftkit.cli", "peftkit.config"): _ENTRY + ": config loads rundir, checkpoint, adapter_io and models",
    ("peftkit.cli", "peftkit.benchmark.config"): _ENTRY + ": the bench's config loads train and the loop",
    ("peftkit.cli", "peftkit.tuning.config"): _ENTRY + ": the tuner's config loads train and the loop",
    ("peftkit.cli_output", "peftkit.benchmark.ladder"): _ENTRY + ": the ladder loads the planner and the loop",
    ("peftkit.cli_output", "peftkit.benchmark.report"): _ENTRY + ": the bench's report loads its results and stats",
    ("peftkit.cli_output", "peftkit.tuning.report"): _ENTRY + ": the tuner's report loads its study storage",
    ("peftkit.cli_output", "peftkit.evaluation"): _ENTRY + ": evaluation loads train, inference and the loop",
}

# (importing module, top-level library): why a light library's import stays inside a function
ALLOWED_LIBRARIES: dict[tuple[str, str], str] = {
    ("peftkit.memory", "ctypes"): (
        "ctypes and ctypes.util (which loads subprocess) would add about 3 ms to `import peftkit`, which"
        " loads memory; only the CLI's own process (at its start) and a run's memory readings call into libc"
    ),
    ("peftkit.env", "packaging"): (
        "not a dependency of peftkit's (it comes with transformers): _same_version compares the text where"
        " it is missing; and packaging.specifiers adds about 8 ms to `import peftkit`"
    ),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = PACKAGE.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


class _Import:
    """One import statement: where it is, and (module, name or None) for each thing it binds."""

    def __init__(self, node: ast.Import | ast.ImportFrom, module: str, is_package: bool, in_function: bool) -> None:
        self.line, self.in_function = node.lineno, in_function
        if isinstance(node, ast.Import):
            self.targets: list[tuple[str, str | None]] = [(alias.name, None) for alias in node.names]
            return
        target = node.module or ""
        if node.level:
            package = (module if is_package else module.rpartition(".")[0]).split(".")
            target = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        # ``from . import registry`` imports the module registry; ``from .tasks import get_task`` a name of the package
        self.targets = [
            (f"{target}.{alias.name}", None) if _is_module(f"{target}.{alias.name}") else (target, alias.name)
            for alias in node.names
        ]

    def internal(self) -> list[tuple[str, str | None]]:
        return [(module, name) for module, name in self.targets if module.split(".")[0] == "peftkit"]


def _imports(path: pathlib.Path) -> list[_Import]:
    module, is_package = _module_name(path), path.name == "__init__.py"
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(_Import(child, module, is_package, in_function))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:  # the body loads nothing at run time
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function)
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _loaded_at_import(module: str) -> tuple[set[str], set[str]]:
    """Importing ``module`` loads ``module``, its packages and what they import at their top, over
    and over: those peftkit modules, and the other top-level packages they import."""
    modules: set[str] = set()
    libraries: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in modules or name not in MODULES:
            continue
        modules.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]
        for imp in IMPORTS[name]:
            if not imp.in_function:
                libraries.update(target.split(".")[0] for target, _ in imp.targets)
                todo += [target for target, _ in imp.targets]
    return modules, libraries


@functools.cache
def _heavy_libraries(module: str) -> frozenset[str]:
    """The heavy libraries importing ``module`` loads."""
    return frozenset(_loaded_at_import(module)[1] & HEAVY_LIBRARIES)


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"


def test_light_modules_are_imported_at_the_top() -> None:
    heavy = {module: bool(_heavy_libraries(module)) for module in MODULES}
    found = [
        f"{_where(module, imp.line)}: {target} loads no heavy library: import it at the top"
        for module, imports in IMPORTS.items()
        for imp in imports
        if imp.in_function
        for target, _ in imp.internal()
        if not heavy.get(target, False) and (module, target) not in ALLOWED
    ]
    assert not found, "a function-level import of a light peftkit module:\n" + "\n".join(sorted(set(found)))


def test_no_function_repeats_a_top_level_import() -> None:
    found = []
    for module, imports in IMPORTS.items():
        top = {target for imp in imports if not imp.in_function for target in imp.targets}
        found += [
            f"{_where(module, imp.line)}: {target}{'.' + name if name else ''} is imported at the top already"
            for imp in imports
            if imp.in_function
            for target, name in imp.targets
            if (target, name) in top
        ]
    assert not found, "a function re-imports what its module imports at the top:\n" + "\n".join(found)


def test_no_private_name_is_imported_across_modules() -> None:
    found = [
        f"{_where(module, imp.line)}: {name} from {target}"
        for module, imports in IMPORTS.items()
        for imp in imports
        for target, name in imp.internal()
        if name and name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not found, "a private name imported from another module (make it public or move it):\n" + "\n".join(found)


def _light_library(target: str) -> str | None:
    """The top-level library ``target`` belongs to, where it is neither peftkit nor heavy."""
    library = target.split(".")[0]
    return None if library == "peftkit" or library in HEAVY_LIBRARIES else library


def _lazy_light_libraries() -> dict[tuple[str, str], list[int]]:
    """(module, light library) -> the lines of the function-level imports of it."""
    lazy: dict[tuple[str, str], list[int]] = {}
    for module, imports in IMPORTS.items():
        for imp in imports:
            if imp.in_function:
                for target, _ in imp.targets:
                    if library := _light_library(target):
                        lazy.setdefault((module, library), []).append(imp.line)
    return lazy


def test_light_libraries_are_imported_at_the_top() -> None:
    found = sorted(
        (MODULES[module], line, library)
        for (module, library), lines in _lazy_light_libraries().items()
        if (module, library) not in ALLOWED_LIBRARIES
        for line in set(lines)
    )
    assert not found, (
        "a function-level import of the standard library or a light dependency (a heavy one belongs in"
        " HEAVY_LIBRARIES):\n"
        + "\n".join(
            f"{path.relative_to(PACKAGE.parent)}:{line}: {library}: import it at the top"
            for path, line, library in found
        )
    )


def test_allowed_libraries_are_still_needed() -> None:
    """Every ``ALLOWED_LIBRARIES`` pair is still a function-level import of a library that is not heavy."""
    lazy = _lazy_light_libraries()
    stale = [f"{module} -> {library}" for module, library in ALLOWED_LIBRARIES if (module, library) not in lazy]
    assert not stale, "ALLOWED_LIBRARIES names imports that are no longer made inside a function: " + ", ".join(stale)


def test_allowed_entries_are_still_needed() -> None:
    """Every ``ALLOWED`` pair is still a function-level import, of a module that is still light."""
    lazy = {
        (module, target)
        for module, imports in IMPORTS.items()
        for imp in imports
        if imp.in_function
        for target, _ in imp.internal()
    }
    stale = [f"{module} -> {target}" for module, target in ALLOWED if (module, target) not in lazy]
    assert not stale, "ALLOWED names imports that are no longer made inside a function: " + ", ".join(stale)


def test_the_check_sees_what_it_checks() -> None:
    """The walk finds torch imported inside train's functions, does not count adapter_io's
    ``TYPE_CHECKING`` import of torch, and so finds peftkit (what ``import peftkit`` loads) light;
    it sees the standard library's function-level imports too (memory's ctypes)."""
    lazy = {target for imp in IMPORTS["peftkit.train"] if imp.in_function for target, _ in imp.targets}
    assert "accelerate" in lazy or "torch" in lazy
    assert not any(target == "torch" for imp in IMPORTS["peftkit.adapter_io"] for target, _ in imp.targets)
    assert _heavy_libraries("peftkit") == frozenset()
    assert ("peftkit.memory", "ctypes") in _lazy_light_libraries()
    assert _light_library("os.path") == "os" and _light_library("torch.nn") is None
