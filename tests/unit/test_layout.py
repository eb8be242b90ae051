"""The shape of `train/` (installed as `proclip_train`), read with `ast` (nothing is imported):

- every import of the package names one of its modules (the `evaluate` modules are loaded by path, so a stale name
  there fails only when a metric loads);
- imports point one way: no cycle among the package's modules (relative imports resolved), and each subpackage imports
  only its own floor and those below it, `LAYERS`: cli -> demo -> hub -> evaluation -> training -> the model files
  (`modeling_proclip` -> `configuration_proclip`); of the rest, only `cli/demo.py` imports the demo;
- the model files (`modeling_proclip/`, `configuration_proclip/`, which travel in every checkpoint as Hub remote code)
  import only each other, the standard library and `MODEL_FILE_DEPENDENCIES`; the configuration never the modeling;
- imports sit at module level, except those of the optional dependencies (`OPTIONAL_DEPENDENCIES`);
- no module is longer than `MAX_LINES` lines.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "train"
PACKAGE = "proclip_train"
# Floors, highest first: a module imports its own floor and those below it, never one above.
LAYERS = ("cli", "demo", "hub", "evaluation", "training", "modeling_proclip", "configuration_proclip")
# The one import between hub/'s subpackages: the Space writes the card's languages and the results' numbers.
HUB_CROSSINGS = {("space", "publish")}
DEMO_GATE = "proclip_train.cli.demo"  # the one module outside the demo that imports it
MODEL_PACKAGES = ("modeling_proclip", "configuration_proclip")
# What the Hub remote code may import beside the standard library and each other (tokenizers: transformers' own
# dependency, present wherever transformers is).
# typing_extensions comes with transformers (through huggingface_hub): typing.Unpack on Python 3.10.
MODEL_FILE_DEPENDENCIES = {"torch", "transformers", "tokenizers", "PIL", "numpy", "typing_extensions"}
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


def floor(module: str) -> int | None:
    """The module's index in `LAYERS` (0 = the top, `cli`); `None` for what is no floor (the bare package, others)."""
    parts = module.split(".")
    name = parts[1] if parts[0] == PACKAGE and len(parts) > 1 else parts[0]
    return LAYERS.index(name) if name in LAYERS else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import that points up a floor, or into the demo from outside it (but `DEMO_GATE`)."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if floor(module) is not None and floor(target) is not None and floor(target) < floor(module):
                found.append(f"{module} -> {target} (up from {LAYERS[floor(module)]} to {LAYERS[floor(target)]})")
            elif floor(target) == LAYERS.index("demo") and floor(module) != floor(target) and module != DEMO_GATE:
                found.append(f"{module} -> {target} (only {DEMO_GATE} imports the demo)")
    return found


def layered_graph() -> dict[str, set[str]]:
    """Module -> the package's modules and the model packages it imports (`modeling_proclip`, ...), by floor."""
    graph = {}
    for name, path in MODULES.items():
        imported = imported_names(path)
        graph[name] = {m for m in imported if m in MODULES and m != name}
        graph[name] |= {m.partition(".")[0] for m in imported if m.partition(".")[0] in MODEL_PACKAGES}
    return graph


MODEL_FILES = sorted(path for package in MODEL_PACKAGES for path in (ROOT / package).glob("*.py"))


def model_file_imports(path: Path) -> list[str]:
    """`line: module` of each import of a model file that is not allowed: a third-party package beyond
    `MODEL_FILE_DEPENDENCIES` (the project's training package included), a sibling file that does not travel with it,
    or, in the configuration, the modeling."""
    own, allowed_packages = path.parent.name, set(MODEL_FILE_DEPENDENCIES) | set(sys.stdlib_module_names)
    siblings = {p.stem for package in MODEL_PACKAGES for p in (ROOT / package).glob("*.py")}
    if own == "modeling_proclip":
        allowed_packages.add("configuration_proclip")  # the installed face; the Hub folder imports it relatively
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "", node.level)]
        else:
            continue
        for module, level in modules:
            top = module.partition(".")[0]
            if level == 0 and top not in allowed_packages:
                found.append(f"{node.lineno}: {module}")
            elif level and (top not in siblings or (own == "configuration_proclip" and top.startswith("modeling"))):
                found.append(f"{node.lineno}: {'.' * level}{module}")
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


def defined_names(path: Path) -> set[str]:
    """The names a module's top level binds (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).partition(".")[0] for a in node.names}
    return names


def test_every_import_of_the_package_names_one_of_its_modules():
    """`from proclip_train.x import y` must name a module `x`, and `y` must be a submodule of it or a name it
    defines (a stale `from ..hub import card` after `card` moved would otherwise fail only when it runs)."""
    stale = []
    for path in MODULES.values():
        for source, names in import_sources(path):
            if source.partition(".")[0] != PACKAGE:
                continue
            if source not in MODULES:
                stale.append(f"{_relative(path)}: {source}")
                continue
            defined = defined_names(MODULES[source])
            stale += [f"{_relative(path)}: {source}.{name}" for name in names
                      if f"{source}.{name}" not in MODULES and name not in defined and name != "*"]
    assert stale == []


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_layering_finder_finds_upward_and_demo_imports():
    """So that the next test cannot pass by reading nothing."""
    graph = layered_graph()
    assert "modeling_proclip" in graph["proclip_train.training.stages"]
    assert "proclip_train.demo.run" in graph[DEMO_GATE]
    probe = {"proclip_train.training.x": {"proclip_train.hub.y", "modeling_proclip"},
             "proclip_train.hub.y": {"proclip_train.demo.run"}, "proclip_train.cli.demo": {"proclip_train.demo.run"},
             "proclip_train.cli.init": {"proclip_train.demo.run", "proclip_train.training.x"}}
    assert layering_violations(probe) == [
        "proclip_train.cli.init -> proclip_train.demo.run (only proclip_train.cli.demo imports the demo)",
        "proclip_train.hub.y -> proclip_train.demo.run (up from hub to demo)",
        "proclip_train.training.x -> proclip_train.hub.y (up from training to hub)",
    ]


def test_imports_point_down_the_floors_and_only_the_demo_verb_imports_the_demo():
    assert layering_violations(layered_graph()) == []


def test_the_hub_subpackages_hold_apart():
    """hub/ has one subpackage per concern (build, export, serving, space, publish); only the Space reads another's
    modules (the card's and the results' readers)."""
    def part(module):
        parts = module.split(".")
        return parts[2] if parts[1:2] == ["hub"] and len(parts) > 3 else None

    crossing = sorted(f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
                      if part(module) and part(target) and part(module) != part(target)
                      and (part(module), part(target)) not in HUB_CROSSINGS)
    assert {part(m) for m in MODULES} - {None} == {"build", "export", "serving", "space", "publish"}
    assert crossing == []


def test_the_model_file_check_finds_forbidden_imports(tmp_path):
    probe = tmp_path / "configuration_proclip" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import os\nimport torch\nimport datasets\nfrom proclip_train import x\n"
                     "from .modeling_proclip import y\nfrom .elsewhere import z\n")
    assert model_file_imports(probe) == ["3: datasets", "4: proclip_train", "5: .modeling_proclip", "6: .elsewhere"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in MODEL_FILES])
def test_model_files_import_only_each_other_and_the_allowed_packages(path):
    assert model_file_imports(path) == []


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
