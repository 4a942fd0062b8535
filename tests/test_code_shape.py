"""The shape of sdport's own code: modules within 400 lines and functions within 60, the exceptions named here
with the reason; and the architecture's import rules (the core never imports torch; the CLI only the API)."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "sdport"
MAX_MODULE, MAX_FUNCTION = 400, 60
#: (module, function) → why it is longer
LONG_FUNCTIONS = {("io/pickle.py", "step"): "one branch per pickle opcode, flat so that each reads as the spec"}
MODULES = sorted(p for p in SRC.rglob("*.py"))


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(SRC).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_modules_and_functions_fit_on_a_screen(path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE, f"{_rel(path)} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if (_rel(path), node.name) not in LONG_FUNCTIONS:
                assert lines <= MAX_FUNCTION, f"{_rel(path)}:{node.lineno} {node.name} has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_every_module_says_what_it_owns(path) -> None:
    assert ast.get_docstring(ast.parse(path.read_text())), f"{_rel(path)} has no module docstring"


def test_torch_is_imported_only_inside_the_functions_that_trace() -> None:
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
                           for n in names), f"{_rel(path)} imports {names} at module level"
