"""The hot modules are compiled with mypyc (``setup.py``): keep them compilable and compiled.

mypy accepts some code that mypyc compiles into something else. The rules below are checked on
the sources, so a change breaks a test rather than a request; the rest is caught by running the
whole suite against the compiled build (which the second test insists on). One more rule, found
that way and too type-dependent to check here: write ``x if x is not None else default``, not
``x or default``, when ``x`` is Optional (mypyc 2.4 raises TypeError on the ``or`` form).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

import alb_proxy

ROOT = Path(__file__).resolve().parent.parent
COMPILED = re.findall(r'"(alb_proxy/[\w/]+)\.py"', (ROOT / "setup.py").read_text())


def _module(path: str) -> str:
    return path.replace("/", ".")


def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / f"{path}.py").read_text())


def test_the_list_names_modules_that_exist() -> None:
    assert len(COMPILED) >= 10
    for path in COMPILED:
        assert (ROOT / f"{path}.py").is_file(), path


def _can_compile() -> bool:
    """What ``make`` checks before building: a C compiler and Python's headers."""
    headers = Path(sysconfig.get_path("include")) / "Python.h"
    return shutil.which("cc") is not None and headers.exists()


@pytest.mark.skipif(os.environ.get("ALB_PROXY_PURE", "0") != "0", reason="pure build asked for")
@pytest.mark.skipif(not _can_compile(), reason="no C compiler or Python headers here")
def test_the_suite_runs_against_the_compiled_build() -> None:
    assert alb_proxy.build() == "compiled"
    for path in COMPILED:
        assert importlib.import_module(_module(path)).__file__.endswith(".so"), path


@pytest.mark.parametrize("path", COMPILED)
def test_an_except_name_keeps_one_type_per_function(path: str) -> None:
    """mypyc types a name once per function: ``except A as exc`` then ``except B as exc``
    makes the second raise TypeError when it catches."""
    for function in ast.walk(_tree(path)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type))
        mixed = {name: kinds for name, kinds in types.items() if len(kinds) > 1}
        assert not mixed, f"{path}.py, {function.name}(): {mixed}"


def test_nothing_interpreted_subclasses_a_compiled_class() -> None:
    """A compiled class takes no interpreted subclass (TypeError at class creation), in the
    package or in the tests."""
    compiled_classes = {
        node.name
        for path in COMPILED
        for node in _tree(path).body
        if isinstance(node, ast.ClassDef)
    }
    sources = [
        p
        for p in (ROOT / "alb_proxy").rglob("*.py")
        if str(p.relative_to(ROOT))[:-3] not in COMPILED
    ]
    sources += list((ROOT / "tests").rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py"))
    offenders = [
        f"{source.relative_to(ROOT)}: {node.name}({base})"
        for source in sources
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ClassDef)
        for base in (ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases)
        if base in compiled_classes
    ]
    assert not offenders
