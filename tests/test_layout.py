"""The code's layout rules (README, "How the code is laid out"), read from the code's own imports:
a family imports only the core, never a sibling; the core and the kernels import no family and
do not test family names; the top-level kernels/ folder never becomes a top-level ``kernels``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from compt.families import REGISTRY, all_families

FAMILY_DIRS = {name: REPO / "compt" / name for name in REGISTRY}
CORE = [p for p in sorted((REPO / "compt").rglob("*.py"))
        if not any(d in p.parents for d in FAMILY_DIRS.values())] + sorted((REPO / "kernels").rglob("*.py"))
LAUNCH = sorted((REPO / "launch").rglob("*.py"))
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """String constants that are not docstrings or parts of f-strings' text."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_family_imports_a_sibling():
    for name, folder in FAMILY_DIRS.items():
        others = [f"compt.{o}" for o in REGISTRY if o != name]
        for path in folder.rglob("*.py"):
            bad = [m for m in _imports(path) if any(m == o or m.startswith(o + ".") for o in others)]
            assert not bad, f"{path.relative_to(REPO)} imports another family: {bad}"


def test_the_core_kernels_and_launcher_import_no_family():
    families = [f"compt.{n}" for n in REGISTRY]
    for path in CORE + LAUNCH:
        bad = [m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in families)]
        assert not bad, f"{path.relative_to(REPO)} imports a family module: {bad}"


def test_the_core_does_not_test_family_names():
    """Family names appear in the core only where families are registered (and the default is named)."""
    allowed = {REPO / "compt" / "families.py"}
    for path in CORE + LAUNCH:
        if path in allowed:
            continue
        hits = [(line, s) for line, s in _string_literals(path) if s in REGISTRY]
        assert not hits, f"{path.relative_to(REPO)} names a family: {hits}"


def test_benchmarks_do_not_branch_on_family_names():
    """A benchmark's setup may name the family it trains (as a chain YAML does); what differs between
    families it asks the family (compt.families), it never compares or looks up family names."""
    for path in BENCHMARKS:
        for node in ast.walk(ast.parse(path.read_text())):
            parts = ([node.left, *node.comparators] if isinstance(node, ast.Compare)
                     else [node.slice] if isinstance(node, ast.Subscript) else [])
            hits = [p.value for p in parts if isinstance(p, ast.Constant) and p.value in REGISTRY]
            assert not hits, f"{path.relative_to(REPO)}:{node.lineno} branches on a family name: {hits}"


def test_no_private_imports_across_modules():
    for path in sorted((REPO / "compt").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py")) + LAUNCH + BENCHMARKS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compt"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(REPO)} imports private names {private} from {node.module}"


def test_every_family_implements_the_contract():
    from compt.families import Family

    wanted = [n for n in dir(Family) if not n.startswith("_")] + list(Family.__annotations__)
    for family in all_families():
        missing = [n for n in wanted if not hasattr(family, n)]
        assert not missing, f"family {family.name} lacks {missing}"


def test_kernels_folder_never_shadows_the_pypi_kernels_package():
    """Run from the repository root (which puts it on sys.path), ``import kernels`` is PyPI's package when
    installed (transformers imports it) and ModuleNotFoundError otherwise; never this repo's folder."""
    code = ("import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent'); sys.exit(0)\n"
            "print(kernels.__file__)\nimport compt.kernels\nprint(compt.kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    if lines[0] != "absent":
        assert not Path(lines[0]).resolve().is_relative_to(REPO / "kernels"), lines
        assert Path(lines[1]).resolve() == (REPO / "kernels" / "__init__.py").resolve()


def test_no_script_folder_holds_a_module_named_kernels():
    """A script's folder is first on sys.path, so a benchmarks/kernels.py would be what transformers gets
    for ``import kernels`` (benchmarks/kernel_bench.py is the kernels benchmark for that reason)."""
    for folder in (REPO / "benchmarks", REPO / "launch", REPO / "tests"):
        assert not (folder / "kernels.py").exists() and not (folder / "kernels").exists(), folder
