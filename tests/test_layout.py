"""The shape of `train/` (installed as `proclip_train`), read with `ast` (nothing is imported):

- every import of the package names one of its modules (the `evaluate` modules are loaded by path, so a stale name
  there fails only when a metric loads);
- imports point one way: no cycle among the package's modules (relative imports resolved);
- imports sit at module level, except those of the optional dependencies (`OPTIONAL_DEPENDENCIES`);
- no module is longer than `MAX_LINES` lines.
"""

import ast
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[1] / "train"
PACKAGE = "proclip_train"
# Genuinely optional: stage 0 (peft), card plots (matplotlib), the GGUF demo LLMs (gguf), the ONNX export (onnx,
# onnxruntime, onnxscript), the handler's local server (starlette, uvicorn), sentence-transformers.
OPTIONAL_DEPENDENCIES = {
    "peft", "matplotlib", "gguf", "sentence_transformers", "onnx", "onnxruntime", "onnxscript", "starlette", "uvicorn",
}
MAX_LINES = 800


def module_name(path: Path) -> str:
    """`train/evaluation/tasks.py` -> `proclip_train.evaluation.tasks`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(TRAIN).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


MODULES = {module_name(path): path for path in sorted(TRAIN.rglob("*.py"))}


def import_sources(path: Path) -> list[tuple[str, list[str]]]:
    """`(module, imported names)` of each `import` / `from ... import` of the file, relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    sources = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            sources += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            sources.append((source, [alias.name for alias in node.names]))
    return sources


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import of the file may load (`from .x import y` gives both `pkg.x` and `pkg.x.y`: `y`
    may be a submodule)."""
    return {full for source, names in import_sources(path) for full in [source, *(f"{source}.{n}" for n in names)]}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    return {name: {m for m in imported_names(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as `[a, b, ..., a]`, or None (depth-first search, modules in sorted order)."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def function_level_imports(path: Path) -> list[str]:
    """`line: module` of each import inside a function (or lambda) of the file, optional dependencies left out."""
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or "."]
                for module in modules:
                    if getattr(child, "level", 0) or module.partition(".")[0] not in OPTIONAL_DEPENDENCIES:
                        found.append(f"{child.lineno}: {module}")
            walk(child, inside)

    walk(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _relative(path: Path) -> str:
    return path.relative_to(TRAIN).as_posix()


def _module_params():
    return [pytest.param(path, id=_relative(path)) for path in MODULES.values()]


def test_the_graph_holds_relative_imports_and_the_cycle_finder_finds_cycles():
    """So that the next test cannot pass by reading nothing."""
    graph = import_graph()
    assert len(graph) > 30
    assert "proclip_train.training.data" in graph["proclip_train.evaluation.tasks"]  # `from ..training.data import`
    assert "proclip_train.demo.languages" in graph["proclip_train.demo.world"]  # `from .languages import`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_of_the_package_names_one_of_its_modules():
    stale = [f"{_relative(path)}: {source}" for path in MODULES.values() for source, _ in import_sources(path)
             if source.partition(".")[0] == PACKAGE and source not in MODULES]  # fmt: skip
    assert stale == []


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_are_found(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import os\n\ndef f():\n    import json\n    from peft import LoraConfig\n    from . import x\n"
                      "    return lambda: __import__('os')\n\nclass A:\n    def g(self):\n        import re\n")
    assert function_level_imports(sample) == ["4: json", "6: .", "11: re"]


@pytest.mark.parametrize("path", _module_params())
def test_imports_sit_at_module_level_except_optional_dependencies(path):
    assert function_level_imports(path) == []


@pytest.mark.parametrize("path", _module_params())
def test_no_module_is_longer_than_the_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{_relative(path)} has {lines} lines"
