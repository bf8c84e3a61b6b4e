"""The package's layout rules, read from the source: imports point down the floors only, there are no import
cycles, and our own modules are imported inside functions only by the CLI's lazy dispatch.

Floors, bottom up (a module may import from a lower floor, or from an earlier module of its own room):

    config -> launcher -> files, runtime -> checkpoint -> model, data, plots, analysis -> report, evalreport -> engine -> tools
    -> flags -> toolflags -> cli

A new module must be added to ROOMS below: that is where its place in the house is decided.
"""

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "xception")

# room -> floor; model, data and plots share a floor and must not import each other.
FLOORS = {"config": 0, "launcher": 1, "files": 2, "runtime": 2, "recipes": 2, "checkpoint": 3, "model": 4, "data": 4,
          "plots": 4, "analysis": 4, "report": 5, "evalreport": 5, "engine": 6, "tools": 7, "flags": 8, "toolflags": 9,
          "cli": 10, "__main__": 11, "__init__": 12}
# Inside a room, a module may import only modules listed before it.
ROOMS = {
    "model": ["xception", "aligned", "hub", "family", "backbone", "ports", "weights", "deploy", "__init__"],
    "data": ["folder", "listfile", "transforms", "check", "loaders", "hfds", "shards", "dali", "__init__"],
    "engine": ["precision", "optim", "mix", "loss", "loop", "ema", "hooks", "setup", "resume", "track", "train", "evaluate", "__init__"],
    "tools": ["__init__", "databench", "syncdebug", "predict", "servebench", "bench", "demo", "export", "prepare", "average",
              "models", "split", "explain", "quantize", "batching", "serve", "hubfolder"],
}
MAX_LAZY_IMPORTS = 22  # imports of our modules inside functions, all in cli.py (one per command, mostly)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    return ".".join(rel)


def resolve(importer: str, node: ast.AST) -> list:
    """Our modules that an import statement of `importer` (a dotted name under xception) brings in."""
    package = importer.split(".")
    if not importer.endswith("__init__"):
        package = package[:-1]
    else:
        package = package[:-1]
    out = []
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            if not (node.module or "").startswith("xception"):
                return []
            base = node.module.split(".")[1:]
        else:
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        for alias in node.names:
            out.append(".".join(base + [alias.name]))
    else:
        out += [".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "xception"]
    return out


def known_module(name: str, modules: set) -> str | None:
    """The module a dotted name refers to: itself, the module holding the imported symbol, or a package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
        if candidate + ".__init__" in modules:
            return candidate + ".__init__"
    return "__init__" if not name else None


def imports_of(source: str, importer: str, modules: set) -> list:
    """[(imported module, line, inside a function)] for every import of our package in `source`."""
    tree = ast.parse(source)
    out = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in resolve(importer, node):
                target = known_module(name, modules)
                if target is not None and target != importer:
                    out.append((target, node.lineno, id(node) in inner))
    return out


def place(module: str) -> tuple:
    """(floor, room, position inside the room) of a module; KeyError for one not in the plan."""
    parts = module.split(".")
    room = parts[0]
    floor = FLOORS[room]
    position = ROOMS[room].index(parts[1]) if room in ROOMS else 0
    return floor, room, position


def violations(graph: dict) -> list:
    """Every import that does not point down: to a higher floor, across rooms on one floor, or to a later
    module of the same room."""
    bad = []
    for importer, targets in graph.items():
        f1, r1, p1 = place(importer)
        for target, line, _ in targets:
            f2, r2, p2 = place(target)
            down = f2 < f1 or (r1 == r2 and p2 < p1) or (importer.endswith("__init__") and r1 == r2)
            if not down:
                bad.append(f"{importer}:{line} imports {target}")
    return bad


def cycles(graph: dict) -> list:
    """The import cycles among our modules (each as a list of modules), by depth-first search."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target, _, _ in graph.get(node, []):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    return found


def package_graph() -> dict:
    files = {}
    for folder, _, names in os.walk(SRC):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                files[module_name(path)] = path
    modules = set(files)
    return {m: imports_of(open(p).read(), m, modules) for m, p in files.items()}


@pytest.fixture(scope="module")
def graph():
    return package_graph()


def test_every_module_has_a_place_in_the_plan(graph):
    unplaced = []
    for module in graph:
        try:
            place(module)
        except (KeyError, ValueError):
            unplaced.append(module)
    assert not unplaced, f"add these to FLOORS/ROOMS in tests/test_layout.py: {unplaced}"


def test_imports_point_down_only(graph):
    assert violations(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_our_modules_are_imported_inside_functions_only_by_the_cli(graph):
    lazy = [(m, t, line) for m, targets in graph.items() for t, line, inside in targets if inside]
    assert all(m == "cli" for m, _, _ in lazy), [x for x in lazy if x[0] != "cli"]
    assert len(lazy) <= MAX_LAZY_IMPORTS, lazy


def test_the_checks_catch_an_upward_import_a_sideways_one_and_a_cycle():
    """The checker itself can fail: on hand-made sources it finds each kind of mistake."""
    modules = {"config", "files", "runtime", "model.xception", "data.folder", "engine.loop", "report"}
    sources = {
        "config": "from .report import x\n",  # upward: the bottom floor importing the reporter
        "data.folder": "def f():\n    from ..model.xception import Xception\n",  # sideways, inside a function
        "report": "from .config import y\n",
        "model.xception": "from ..config import z\n",
    }
    graph = {m: imports_of(src, m, modules) for m, src in sources.items()}
    found = violations(graph)
    assert any(v.startswith("config:1 imports report") for v in found)
    assert any(v.startswith("data.folder:2 imports model.xception") for v in found)
    assert graph["data.folder"][0][2] is True  # seen as an import inside a function
    assert cycles(graph) == [["config", "report", "config"]]
