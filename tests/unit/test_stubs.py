"""Every public name of a compiled module is in its .pyi, and every name of
the .pyi in the module (CI keeps the typed boundary complete and true: a
name added to a .pyx without its stub, or removed with its stub left, fails
here)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src/octoproxy/_core"
MODULES = sorted(p.stem for p in CORE.glob("*.pyx"))


def stub_names(stem: str) -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse((CORE / f"{stem}.pyi").read_text())
    top: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            members = set()
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    members.add(m.name)
                elif isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name):
                    members.add(m.target.id)
                elif isinstance(m, ast.Assign):
                    members.update(t.id for t in m.targets if isinstance(t, ast.Name))
            classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, ast.Assign):
            top.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return top, classes


@pytest.mark.parametrize("stem", MODULES)
def test_every_public_compiled_name_is_in_the_stub(stem: str) -> None:
    mod = importlib.import_module(f"octoproxy._core.{stem}")
    top, classes = stub_names(stem)
    public = {
        n for n, v in vars(mod).items()
        if not n.startswith("_") and not isinstance(v, type(ast))  # not an imported module
        and getattr(v, "__module__", mod.__name__) == mod.__name__  # nor imported from one
    }
    missing = sorted(public - top)
    assert not missing, f"{stem}.pyi lacks {missing}"
    # and the other way: a function deleted from the .pyx leaves no stale stub
    # (a bench calling it type-checks, then fails at run time)
    funcs = {n.name for n in ast.parse((CORE / f"{stem}.pyi").read_text()).body
             if isinstance(n, ast.FunctionDef)}
    stale = sorted(n for n in funcs if not hasattr(mod, n))
    assert not stale, f"{stem}.pyi names {stale}, which {stem} does not have"
    for name, members in classes.items():
        cls = getattr(mod, name, None)
        assert cls is not None, f"{stem}.pyi names {name}, which {stem} does not have"
        if not isinstance(cls, type) or issubclass(cls, BaseException):
            continue
        own = {n for n in vars(cls) if not n.startswith("_")}
        if hasattr(cls, "__members__"):  # enums: the members
            own = set(cls.__members__)
        gaps = sorted(own - members - set().union(*(
            classes.get(b.__name__, set()) for b in cls.__mro__[1:])))
        assert not gaps, f"{stem}.pyi: {name} lacks {gaps}"
