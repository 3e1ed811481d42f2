"""Layering: the models know nothing about Lightning modules or training (sr_lab/models must not import
sr_lab/modules), so a stage's parts can be reused by any stage kind."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package,forbidden", [("sr_lab/models", "sr_lab.modules"),
                                               ("sr_lab/diffusion", "sr_lab.modules"),
                                               ("sr_lab/models", "lightning")])
def test_package_does_not_import(package, forbidden):
    offenders = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n == forbidden or n.startswith(forbidden + ".")]
    assert not offenders, offenders
