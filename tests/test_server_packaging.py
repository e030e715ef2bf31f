"""Packaging (issue 19, item 9): pyproject declares every third-party module the package imports, in the core
or, for eval/experiment-only ones, in an extra whose name the import's error message gives; the test extra
pulls in everything; torch is a range while README and .ci/run install exactly 2.13.0 first."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name → distribution, where they differ or come with another distribution
DISTRIBUTION = {"pydantic_core": "pydantic"}
EXTRA_ONLY = {"openai": "eval", "matplotlib": "eval", "pyarrow": "eval", "scipy": "experiments"}  # imported lazily, inside functions


def requirements(group: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(line)).name.lower(): r for line in group}


def imports() -> dict[str, set[str]]:
    """Third-party top-level modules imported anywhere in src/gptoss → the files importing them."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "gptoss").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top != "gptoss":
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_import_is_declared():
    core = requirements(PROJECT["dependencies"])
    extras = {k: requirements(v) for k, v in PROJECT["optional-dependencies"].items()}
    for module, files in imports().items():
        dist = DISTRIBUTION.get(module, module).lower()
        if module in EXTRA_ONLY:
            assert dist in extras[EXTRA_ONLY[module]] and dist not in core, (module, files)
        else:
            assert dist in core, f"{module} (imported by {sorted(files)}) is not a dependency"
    assert core["tiktoken"].specifier.contains("0.11.0") and not core["tiktoken"].specifier.contains("0.10.0")
    assert str(core["torch"].specifier) in ("<2.14,>=2.13", ">=2.13,<2.14")
    test = extras["test"]
    assert set(extras["eval"]) | set(extras["experiments"]) <= set(test)  # .ci/run installs .[test] only


def test_readme_and_ci_install_exactly_torch_2_13_0_first():
    assert "pip install torch==2.13.0 && pip install -e \".[test]\"" in (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -e . && gptoss chat" in (ROOT / "README.md").read_text()


def test_a_missing_extra_is_named(monkeypatch):
    from gptoss.errors import GptOssError
    from gptoss.evals.runner import Endpoint
    from gptoss.experiments.runner import pyplot

    monkeypatch.setitem(sys.modules, "openai", None)  # import openai → ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(GptOssError, match=r"gptoss\[eval\]"):
        Endpoint("http://127.0.0.1:9/v1", "m").client()
    with pytest.raises(GptOssError, match=r"gptoss\[experiments\]"):
        pyplot()
