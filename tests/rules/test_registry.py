"""The rule table: each op's rule is declared once, in its family's module."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fwdgrad
from fwdgrad import registry

aten = torch.ops.aten
RULES_DIR = pathlib.Path(fwdgrad.__file__).parent / "rules"


FRESH_TABLE = """
import json, pathlib, fwdgrad
from fwdgrad import registry
print(json.dumps([[str(op)] + (list(registry.where(op)) if registry.where(op) else [None, None, None])
                  for op in registry.RULES]))
"""


def _fresh_table():
    """The table as importing fwdgrad leaves it (other tests override rules)."""
    env = dict(os.environ, PYTHONPATH=str(RULES_DIR.parent.parent))
    out = subprocess.run([sys.executable, "-c", FRESH_TABLE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_rule_has_one_declaration_in_a_rule_module():
    table = _fresh_table()
    assert len(table) > 400
    misplaced = {op: (file, line, how) for op, file, line, how in table
                 if file is None or pathlib.Path(file).parent != RULES_DIR or how == "register_jvp"}
    assert misplaced == {}
    # one declaration per overload, at its own place in the source
    assert len({op for op, *_ in table}) == len(table)
    # no rule module writes into the table behind the vocabulary's back
    for path in RULES_DIR.glob("*.py"):
        assert not re.search(r"RULES\[[^\]]+\]\s*=", path.read_text()), f"{path.name} writes into RULES"


def test_a_second_declaration_raises_with_the_first_place():
    op = aten.tanh.default
    file, line, _ = registry.where(op)
    before = registry.RULES[op]
    with pytest.raises(RuntimeError, match=re.escape(f"{file}:{line}")):
        registry.def_zero(op)
    assert registry.RULES[op] is before and registry.where(op)[:2] == (file, line)


def test_register_jvp_overrides_and_is_recorded():
    op = aten.tanh.default
    before, place = registry.RULES[op], registry.where(op)
    x, v = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    try:
        fwdgrad.register_jvp(op, lambda t, ans, x: 2 * t[0])
        assert registry.where(op)[2] == "register_jvp"
        assert torch.equal(fwdgrad.jvp(torch.tanh, (x,), (v,))[1], 2 * v)
    finally:
        fwdgrad.register_jvp(op, before)
        registry._declared[op] = place
    torch.testing.assert_close(fwdgrad.jvp(torch.tanh, (x,), (v,))[1], 1 - torch.tanh(x) ** 2)


def test_where_on_the_command_line():
    env = dict(os.environ, PYTHONPATH=str(RULES_DIR.parent.parent))
    out = subprocess.run([sys.executable, "-m", "fwdgrad.rules", "where", "aten.tanh", "aten.mm"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    file, line, how = registry.where(aten.tanh.default)
    assert f"aten.tanh.default: fwdgrad/rules/{pathlib.Path(file).name}:{line} ({how})" in out.stdout
    assert "aten.mm.default: fwdgrad/rules/linalg.py:" in out.stdout
