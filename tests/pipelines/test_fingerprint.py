"""Caches know the code (issue 18): a step's key includes a fingerprint of the source it runs, so
editing a stage function changes the keys of exactly the steps that call it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import registry
from pipelines.fingerprint import code_fingerprint, code_sources

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _ref(module: str, name: str):
    """A stand-in for a function ``module.name`` of a source tree that is not importable."""

    def f():
        pass

    f.__module__, f.__qualname__ = module, name
    return f


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    _write(root / "stages" / "__init__.py", "")
    _write(root / "pipelines" / "__init__.py", "")
    _write(
        root / "stages" / "ops.py",
        "TABLE = {'a': 1}\n\n"
        "def scale(x):\n    return 2 * x\n\n"
        "def shift(x):\n    '''Add one.'''\n    return x + 1  # by one\n\n"
        "def both(x):\n    return shift(scale(x))\n",
    )
    _write(
        root / "pipelines" / "demo.py",
        "from stages.ops import shift\nfrom stages import ops\n\n"
        "def uses_scale(ctx):\n    from stages.ops import scale\n    return scale(1)\n\n"
        "def uses_shift(ctx):\n    return shift(1)\n\n"
        "def uses_both(ctx):\n    return ops.both(1)\n\n"
        "def uses_table(ctx):\n    return ops.TABLE['a']\n\n"
        "def uses_nothing(ctx):\n    return 0\n",
    )
    return root


STEPS = ("uses_scale", "uses_shift", "uses_both", "uses_table", "uses_nothing")


def _fingerprints(root: Path) -> dict[str, str]:
    return {s: code_fingerprint(_ref("pipelines.demo", s), root) for s in STEPS}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_edit_changes_exactly_the_steps_that_reach_it(tree):
    before = _fingerprints(tree)
    assert len(set(before.values())) == len(STEPS)
    ops = tree / "stages" / "ops.py"
    _edit(ops, "return 2 * x", "return 3 * x")  # scale: called directly and through both()
    after = _fingerprints(tree)
    assert {s for s in STEPS if after[s] != before[s]} == {"uses_scale", "uses_both"}
    _edit(ops, "{'a': 1}", "{'a': 2}")  # a constant is code too
    again = _fingerprints(tree)
    assert {s for s in STEPS if again[s] != after[s]} == {"uses_table"}


def test_comments_docstrings_and_formatting_keep_the_fingerprint(tree):
    before = _fingerprints(tree)
    ops = tree / "stages" / "ops.py"
    _edit(ops, "'''Add one.'''", "'''Add one to x.'''")
    _edit(ops, "# by one", "# by exactly one")
    _edit(ops, "return x + 1", "return (x\n            + 1)")
    assert _fingerprints(tree) == before


def test_the_disk_cache_sees_an_edit(tree):
    ref = _ref("pipelines.demo", "uses_shift")
    first = code_fingerprint(ref, tree)
    assert code_fingerprint(ref, tree) == first  # from the cache
    _edit(tree / "stages" / "ops.py", "x + 1", "x + 2")
    assert code_fingerprint(ref, tree) != first


def test_rcnn_steps_reach_the_stage_functions_they_call():
    spec = registry.get("rcnn")
    steps = spec.steps(spec.build_config("ci"))
    reach = {s.name: set(code_sources(s.fn)) for s in steps}
    users = lambda key: {name for name, keys in reach.items() if key in keys}  # noqa: E731
    assert users("stages.detection.svm:HardNegativeSVM") == {"svm"}
    detects = {name for name in reach if name.startswith("detect")}  # detect (and detect-nobb)
    assert detects and users("stages.detection.nms:nms_per_class") == detects
    assert users("stages.detection.evaluate:evaluate_detections") >= {"evaluate"}
    assert "proposals" in users("stages.detection.proposals:proposals_table")


def test_editing_a_real_stage_function_changes_exactly_its_steps(tmp_path):
    """On a copy of this repository: edit `nms_per_class`; only the steps calling it change."""
    root = tmp_path / "repo"
    for pkg in ("pipelines", "stages", "data"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    spec = registry.get("rcnn")
    steps = spec.steps(spec.build_config("ci"))
    before = {s.name: code_fingerprint(s.fn, root) for s in steps}
    nms = root / "stages" / "detection" / "nms.py"
    line = "    b, s, lab = _check(boxes, scores, labels)\n"  # nms_per_class's first statement
    assert nms.read_text().count(line) == 1
    _edit(nms, line, line + "    _unused = 0\n")
    after = {s.name: code_fingerprint(s.fn, root) for s in steps}
    detects = {n for n in before if n.startswith("detect")}
    assert detects and {n for n in before if before[n] != after[n]} == detects
