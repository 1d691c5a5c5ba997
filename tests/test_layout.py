"""The house rules a newcomer relies on, checked on the source itself: small files and
functions, imports that point down with no circle, a core with no outside imports,
and every silenced type error saying which and why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import freshpool

SRC = Path(freshpool.__file__).parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The freshpool modules `name` imports when it is imported (not in functions, not
    for type checking only)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    return {t for t in targets if t in known and t != name}


def test_no_file_or_function_is_too_long() -> None:
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def test_imports_form_no_circle() -> None:
    known = modules()
    graph = {name: top_level_imports(name, path, set(known)) for name, path in known.items()}
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_core_imports_nothing_outside_core() -> None:
    known = modules()
    outside = {
        name: sorted(t for t in top_level_imports(name, path, set(known)) if ".core" not in t)
        for name, path in known.items()
        if name.startswith("freshpool.core")
    }
    for name, path in known.items():
        if name.startswith("freshpool.core"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("freshpool"):
                    assert node.module.startswith("freshpool.core"), (name, node.module)
    assert all(not targets for targets in outside.values()), outside


def test_every_silenced_type_error_names_its_code_and_why() -> None:
    bare = []
    for name, path in modules().items():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "type: ignore" not in line:
                continue
            said = re.search(r"type: ignore\[[a-z-]+(, [a-z-]+)*\]\s+#\s*\S", line)
            above = path.read_text().splitlines()[number - 2].strip().startswith("#")
            if not said and not above:
                bare.append(f"{name}:{number}")
    assert bare == []
