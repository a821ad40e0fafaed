"""What code computes a step: a fingerprint that enters the step's key (issue 18, "caches know the
code"), so that editing a stage function recomputes the steps that call it and no others.

The fingerprint of a step's adaptor is a hash over the source of every function, class and
module-level constant of the project that it reaches: the adaptor itself, the names its body uses
(module globals, ``from stages... import x`` inside the body, ``module.attr`` through an imported
module), then theirs, transitively. It is computed statically from the source files (``ast``):
nothing is imported, so fingerprinting a pipeline never loads torch (a cached run stays well under
a second). Sources are compared as parsed Python with comments and docstrings removed
(``ast.unparse``), so rewording a comment or reformatting keeps every cache.

Not followed, by design: library code (numpy, torch, ...: pinned in ``constraints.txt``); the
engine, runner and executors (they schedule work; results never depend on them); arguments bound
with ``functools.partial`` (execution knobs such as a shard size, kept out of keys on purpose).
Over-inclusion is possible (a name that is also a local variable) and only costs a recompute.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the directory holding pipelines/, stages/, data/
PROJECT_PACKAGES = ("pipelines", "stages", "data")
# framework modules that run steps but compute no result
NOT_FOLLOWED = ("pipelines.engine", "pipelines.runner", "pipelines.cli", "pipelines.sweep")
_MEMO: dict[str, dict] = {}  # this process's fingerprints, still checked against file stats


def code_fingerprint(fn: Callable, root: Path = ROOT) -> str:
    """A 16-hex-digit hash of the code ``fn`` runs (see the module docstring).

    Remembered on disk per function with the size and mtime of every file it read, so a run whose
    code did not change pays a few ``stat`` calls per step instead of parsing (≈ 0.8 s for R-CNN)."""
    fn = _unwrap(fn)
    ident = f"{root}|{fn.__module__}:{fn.__qualname__}"
    entry = _MEMO.get(ident)
    if entry and all(_stat(path) == tuple(st) for path, st in entry["files"].items()):
        return entry["fp"]
    cache = _read_cache()
    entry = cache.get(ident)
    if entry and all(_stat(path) == tuple(st) for path, st in entry["files"].items()):
        _MEMO[ident] = entry
        return entry["fp"]
    modules: set[str] = set()
    parts = code_sources(fn, root, modules)
    blob = "\n".join(f"{name}\n{src}" for name, src in sorted(parts.items()))
    fp = hashlib.sha256(blob.encode()).hexdigest()[:16]
    files = {str(f[0]): _stat(str(f[0])) for m in modules if (f := _module_file(m, root))}
    cache[ident] = _MEMO[ident] = {"files": files, "fp": fp}
    # entries whose files are gone (a deleted checkout, a test's temporary tree) are dropped
    stale = [k for k, e in cache.items() if any(_stat(f)[1] < 0 for f in e["files"])]
    for k in stale:
        del cache[k]
    _write_cache(cache)
    return fp


def code_sources(
    fn: Callable, root: Path = ROOT, modules: set[str] | None = None
) -> dict[str, str]:
    """``{"module:name": normalised source}`` for everything ``fn`` reaches (``fn`` included);
    ``modules`` collects the modules read."""
    fn = _unwrap(fn)
    module, qualname = fn.__module__, fn.__qualname__
    top = qualname.split(".")[0]
    out: dict[str, str] = {}
    if "<locals>" in qualname or _module_info(module, root) is None:  # no file to read: bytecode
        code = getattr(fn, "__code__", None)
        out[f"{module}:{qualname}"] = code.co_code.hex() if code else repr(fn)
        return out
    _visit(module, top, out, root, force=True, modules=modules)
    return out


def _unwrap(fn):
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.unwrap(fn)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paperline" / "code-fingerprints.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    path = _cache_path()
    try:  # best effort: a read-only home only costs the parse next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass


# -- one module's symbols, parsed once per file version ---------------------------------------------
@dataclass(eq=False)  # hashed by identity: one object per parsed file version (lru_cache)
class _Module:
    name: str
    is_package: bool
    defs: dict[str, ast.AST] = field(default_factory=dict)  # def / class / NAME = ... at top level
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # alias -> (mod, attr)


def _module_file(name: str, root: Path) -> tuple[Path, bool] | None:
    base = root.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    return None


def _module_info(name: str, root: Path) -> _Module | None:
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    found = _module_file(name, root)
    if found is None:
        return None
    path, is_package = found
    st = os.stat(path)
    return _parse(str(path), st.st_mtime_ns, st.st_size, name, is_package)


@functools.lru_cache(maxsize=1024)
def _parse(path: str, mtime_ns: int, size: int, name: str, is_package: bool) -> _Module:
    tree = _strip_docstrings(ast.parse(Path(path).read_text()))
    mod = _Module(name, is_package)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            mod.defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        mod.defs[n.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mod.imports.update(_import_bindings(node, mod))
    return mod


def _import_bindings(node: ast.Import | ast.ImportFrom, mod: _Module) -> dict:
    out = {}
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.asname:
                out[a.asname] = (a.name, None)
            else:
                out[a.name.split(".")[0]] = (a.name.split(".")[0], None)
        return out
    base = node.module or ""
    if node.level:  # relative import
        parts = mod.name.split(".")
        parts = parts if mod.is_package else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    for a in node.names:
        out[a.asname or a.name] = (base, a.name)
    return out


# -- the walk -------------------------------------------------------------------------------------
def _followed(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES and not module.startswith(NOT_FOLLOWED)


def _visit(
    module: str, name: str, out: dict, root: Path, force: bool = False, modules: set | None = None
) -> None:
    """Add ``module:name`` (a def, class or constant) and everything it uses, depth first."""
    todo = [(module, name, force)]
    while todo:
        module, name, forced = todo.pop()
        key = f"{module}:{name}"
        if key in out or not (forced or _followed(module)):
            continue
        info = _module_info(module, root)
        if info is None:
            continue
        if modules is not None:
            modules.add(module)
        source, refs = _symbol(info, name, str(root))
        if source is not None:
            out[key] = source
        todo += [(m, n, False) for m, n in refs]


@functools.lru_cache(maxsize=8192)
def _symbol(info: _Module, name: str, root_str: str) -> tuple[str | None, tuple]:
    """(normalised source or None, the (module, name) pairs it uses); cached per file version
    (``info`` is one object per parsed file version)."""
    root = Path(root_str)
    node = info.defs.get(name)
    if node is None:  # a re-export: `from x import name` in this module
        target_mod, attr = info.imports.get(name, (None, None))
        if attr is None or _module_file(f"{target_mod}.{attr}", root) is not None:
            return None, ()  # unknown, or a submodule (its functions come by attribute)
        return None, ((target_mod, attr),)
    refs: list[tuple[str, str]] = []
    local_imports: dict[str, tuple[str, str | None]] = {}
    names: list[ast.Name | ast.Attribute] = []
    for n in ast.walk(node):  # one pass: imports in the body, then the names they bind
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load):
                names.append(n)
        elif isinstance(n, ast.Attribute):
            if isinstance(n.value, ast.Name):
                names.append(n)
        elif isinstance(n, ast.Import | ast.ImportFrom):
            local_imports.update(_import_bindings(n, info))
    for target_mod, attr in local_imports.values():
        if attr is not None and _module_file(f"{target_mod}.{attr}", root) is None:
            refs.append((target_mod, attr))
    for n in names:
        if isinstance(n, ast.Name):
            binding = local_imports.get(n.id) or info.imports.get(n.id)
            if binding is None:
                if n.id in info.defs and n.id != name:
                    refs.append((info.name, n.id))
            elif (
                binding[1] is not None and _module_file(f"{binding[0]}.{binding[1]}", root) is None
            ):
                refs.append(binding)
        else:
            # `alias.attr` through an imported module: `rcnn_detect.train_svms` (np.zeros: not ours)
            binding = local_imports.get(n.value.id) or info.imports.get(n.value.id)
            if binding is not None:
                target = binding[0] if binding[1] is None else f"{binding[0]}.{binding[1]}"
                if target.split(".")[0] in PROJECT_PACKAGES and _module_file(target, root):
                    refs.append((target, n.attr))
    source = ast.dump(node, annotate_fields=False)  # no comments, no positions, no formatting
    return source, tuple(dict.fromkeys(refs))


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    """Drop the docstrings of the module, its classes and functions (nested ones too); only
    statement bodies are visited, not expressions (docstrings are never inside those)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        for attr in ("body", "orelse", "finalbody", "handlers"):
            stmts = getattr(node, attr, None)
            if not isinstance(stmts, list):
                continue
            if (
                attr == "body"
                and isinstance(
                    node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                )
                and stmts
                and isinstance(stmts[0], ast.Expr)
                and isinstance(stmts[0].value, ast.Constant)
                and isinstance(stmts[0].value.value, str)
            ):
                stmts = node.body = stmts[1:] or [ast.Pass()]
            todo += [st for st in stmts if isinstance(st, ast.stmt | ast.excepthandler)]
    return tree
