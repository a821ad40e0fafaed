"""The repository's shape, checked from the source (issue 17): one package per paper, imports that
run one way, no cycles. Failing here means a move or an import broke the layout the README's Layout
section describes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelines import registry

ROOT = Path(__file__).resolve().parents[2]
TOP = ("pipelines", "stages", "cluster", "data")
PAPERS = tuple(registry.MODULES)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in TOP for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a
    module, else ``a.b``). ``top_level_only``: skip imports inside functions (they run lazily and
    cannot take part in an import-time cycle)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under `if` / `try` at module level
        nodes = [n for top in tree.body if not isinstance(top, ast.FunctionDef | ast.ClassDef)
                 for n in ast.walk(top)]  # fmt: skip
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in TOP}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in TOP:
                continue
            if _is_type_checking_block(tree, node):
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def _is_type_checking_block(tree: ast.Module, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(target is n for n in ast.walk(node)):
                return True
    return False


@pytest.mark.parametrize("paper", PAPERS)
def test_each_paper_is_one_package_with_the_standard_files(paper):
    pkg = ROOT / "pipelines" / paper
    assert registry.MODULES[paper] == f"pipelines.{paper}"
    for name in ("__init__.py", "config.py", "steps.py", "report.py"):
        assert (pkg / name).is_file(), f"pipelines/{paper}/{name} missing"
    spec = registry.get(paper)
    assert spec.name == paper
    assert spec.config.__module__ == f"pipelines.{paper}.config"
    assert spec.steps.__module__ == f"pipelines.{paper}.steps"
    # every step adaptor lives in the paper's own package (or is the engine's)
    for step in spec.steps(spec.build_config()):
        fn = getattr(step.fn, "func", step.fn)  # functools.partial
        assert fn.__module__.startswith(f"pipelines.{paper}."), (step.name, fn.__module__)


def test_no_module_imports_a_sibling_papers_package():
    bad = []
    for name, path in MODULES.items():
        parts = name.split(".")
        if parts[0] != "pipelines" or len(parts) < 2 or parts[1] not in PAPERS:
            continue
        for imp in _imports(path, top_level_only=False):
            ip = imp.split(".")
            if ip[0] == "pipelines" and len(ip) > 1 and ip[1] in PAPERS and ip[1] != parts[1]:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


@pytest.mark.parametrize("paper", PAPERS)
def test_config_never_imports_the_steps(paper):
    imports = _imports(ROOT / "pipelines" / paper / "config.py", top_level_only=False)
    own = {i for i in imports if i.startswith(f"pipelines.{paper}")}
    assert not own, f"pipelines/{paper}/config.py imports {own}"


def test_stages_cluster_and_data_never_import_pipelines():
    bad = [
        f"{name} imports {imp}"
        for name, path in MODULES.items()
        if not name.startswith("pipelines")
        for imp in _imports(path, top_level_only=False)
        if imp.startswith("pipelines")
    ]
    assert not bad, bad


def test_no_import_cycles():
    graph = {name: _imports(path, top_level_only=True) for name, path in MODULES.items()}
    # a package's submodule importing the package itself is how `from pipelines.rcnn import
    # detect` reads: only the submodule is loaded, so such edges to a parent are not cycles
    for name, deps in graph.items():
        graph[name] = {d for d in deps if d in graph and not name.startswith(d + ".")}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_cycle_finder_finds_one(tmp_path, monkeypatch):
    """The cycle test above must be able to fail: two modules importing each other are caught."""
    (tmp_path / "a.py").write_text("from pipelines.b import x\n")
    (tmp_path / "b.py").write_text("from pipelines.a import y\n")
    monkeypatch.setitem(MODULES, "pipelines.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "pipelines.b", tmp_path / "b.py")
    with pytest.raises(pytest.fail.Exception, match="pipelines.a -> pipelines.b -> pipelines.a"):
        test_no_import_cycles()
