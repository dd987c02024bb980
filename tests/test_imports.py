"""ditq's modules import each other without cycles: every import that runs when a module is imported counts,
those under `if TYPE_CHECKING:` too (a cycle a type checker needs is still a cycle)."""

import ast
from pathlib import Path

import ditq

PACKAGE = Path(ditq.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class ImportTime(ast.NodeVisitor):
    """The import statements of a module outside its functions' bodies."""

    def __init__(self) -> None:
        self.imports: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.imports.append(node)

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node: ast.AST) -> None:
        pass  # runs when called, not when imported

    visit_AsyncFunctionDef = visit_FunctionDef


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The ditq modules `path` imports when it is imported (`from a import b` is `a.b` when that is a module)."""
    visitor = ImportTime()
    visitor.visit(ast.parse(path.read_text()))
    found = set()
    for node in visitor.imports:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            base = node.module
            if node.level:
                package = module_name(path).split(".")
                package = package if path.name == "__init__.py" else package[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + [node.module])
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)) is not None:
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_ditq_has_no_import_cycles():
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
