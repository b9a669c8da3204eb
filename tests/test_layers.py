"""The package's shape, checked from its source: no import cycles, imports only downwards through
the layers the folders show, and functions and modules short enough to read at once."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "kneescreen"
# Lowest first; a module may import from its own layer or any layer below, never above.
LAYERS = [
    {"kneescreen.errors", "kneescreen.labels", "kneescreen.metrics", "kneescreen.triage", "kneescreen.config"},
    {"kneescreen.fileio"},
    {"kneescreen._private", "kneescreen.data"},
    {"kneescreen.model"},
    {"kneescreen.train", "kneescreen.screen", "kneescreen.link"},
    {"kneescreen.report", "kneescreen.report_referral"},
    {"kneescreen.demo"},
    {"kneescreen.cli"},
]
MAX_LINES = 60
LONG_OK = "# long-function:"  # marker + reason, on the line after a def that may exceed MAX_LINES
MAX_MODULE_LINES = 400
LONG_MODULE_OK = "Long module:"  # a module docstring line starting with this says why it may be longer


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Every kneescreen module this file imports, at any depth of the file (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports pkg.sub; `from pkg.mod import name` imports pkg.mod.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for n in names:
            if n.startswith("kneescreen"):
                while n not in modules:
                    n = n.rsplit(".", 1)[0]
                found.add(n)
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep == "kneescreen":
                continue  # the package root re-exports; nothing inside imports it
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, deps in _graph().items():
        if module == "kneescreen":
            continue
        for dep in deps:
            if dep == "kneescreen":
                wrong.append(f"{module} imports the package root (import the defining module instead)")
            elif _layer(dep) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_says_what_lives_there():
    for init in PKG.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def _long_functions() -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if n > MAX_LINES and LONG_OK not in body:
                    out.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_functions_fit_on_a_screen():
    assert not _long_functions(), "split these, or say why not with '# long-function: <reason>':\n" + \
        "\n".join(_long_functions())


def _long_modules(pkg: pathlib.Path = PKG) -> list[str]:
    """Modules over MAX_MODULE_LINES lines whose docstring does not say why (`LONG_MODULE_OK`)."""
    out = []
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n <= MAX_MODULE_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith(LONG_MODULE_OK) for line in doc.splitlines()):
            out.append(f"{path.relative_to(pkg.parent)} ({n} lines)")
    return out


def test_modules_fit_in_one_reading():
    long = _long_modules()
    assert not long, (f"modules over {MAX_MODULE_LINES} lines: split them by concern, or say why not with a "
                      f"docstring line starting '{LONG_MODULE_OK}':\n" + "\n".join(long))


def test_module_size_check_flags_long_modules(tmp_path):
    """Guards the guard: a long module is flagged unless its docstring says why."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    body = "x = 1\n" * MAX_MODULE_LINES
    (pkg / "short.py").write_text('"""Fits."""\n' + "x = 1\n" * (MAX_MODULE_LINES - 1))
    (pkg / "sub" / "long.py").write_text('"""Too long."""\n' + body)
    (pkg / "sub" / "said.py").write_text(f'"""Long, and says why.\n\n{LONG_MODULE_OK} one table.\n"""\n' + body)
    assert _long_modules(pkg) == [f"pkg/sub/long.py ({MAX_MODULE_LINES + 1} lines)"]


@pytest.mark.parametrize("module", ["kneescreen.screen.pipeline", "kneescreen.train.run", "kneescreen.cli"])
def test_the_checks_see_real_edges(module):
    """Guards the guard: the graph must contain the edges we know exist."""
    graph = _graph()
    assert graph[module], f"{module} shows no imports: the walker is broken"
    assert "kneescreen.fileio.store" in graph["kneescreen.screen.pipeline"]
