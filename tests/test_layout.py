"""How the top-level packages import each other: no import cycles among libs/, services/, yuebing/
and bench/ (imports inside functions count too; those under ``if TYPE_CHECKING:`` never run and do
not), and the product never imports the benchmarks,
except for the one lazy dispatch of ``yuebing bench`` in ``yuebing/cli.py``.

``python tests/test_layout.py`` prints the import graph's cycles and the product's imports of bench.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("libs", "services", "yuebing", "bench")
PRODUCT = ("libs", "services", "yuebing")
BENCH_DISPATCH = "yuebing.cli"  # the only product module allowed to import bench, and only inside a function


def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module an import of ``name`` loads: the longest known prefix of it."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:`` (for annotations only: never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file that can run, wherever
    it stands."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    skip = _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            # ``from a import b`` loads a.b when that is a module, else a
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.append((target, node.lineno, id(node) in top_level))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _, _ in imports(m, p, known)} for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def product_imports_of_bench() -> list[str]:
    """``module:line`` of every import of bench from the product code, the allowed dispatch aside."""
    known = modules()
    out = []
    for m, p in known.items():
        if m.split(".")[0] not in PRODUCT:
            continue
        for target, line, module_level in imports(m, p, known):
            if target.split(".")[0] != "bench":
                continue
            if m == BENCH_DISPATCH and not module_level:
                continue
            out.append(f"{m}:{line} imports {target}")
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_product_does_not_import_the_benchmarks():
    assert product_imports_of_bench() == []


def test_the_checker_sees_a_cycle_and_imports_inside_functions(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    path = tmp_path / "m.py"
    path.write_text("import libs.stats\nif TYPE_CHECKING:\n    import libs.log\n\ndef f():\n"
                    "    from bench import common\n")
    found = imports("yuebing.m", path, modules())
    assert found == [("libs.stats", 1, True), ("bench.common", 6, False)]


if __name__ == "__main__":
    g = graph()
    found = cycles(g)
    print(f"{len(g)} modules, {sum(len(v) for v in g.values())} import edges (function-level imports included)")
    print("cycles:", "none" if not found else "")
    for c in found:
        print("  " + " <-> ".join(c))
    leaks = product_imports_of_bench()
    print("product imports of bench (besides the lazy dispatch in yuebing/cli.py):", "none" if not leaks else "")
    for line in leaks:
        print("  " + line)
    sys.exit(1 if found or leaks else 0)
