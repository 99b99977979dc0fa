"""The parts of ``transformers`` progtuning leans on beyond its public API still exist.

:class:`~progtuning.runs.checkpoints.ProgtuningTrainer` overrides private ``Trainer`` methods (the
checkpoint and RNG-state writers), reaches private ones through ``self``/``super()`` and sets an
attribute the Trainer reads. A transformers release may rename any of them; an override of a name
the Trainer no longer calls would then be silently dead. pyproject pins ``transformers<6``; these
tests catch drift inside a major version. Every list is derived from the code itself, so a new
override or a new private call is covered without touching this file.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import transformers
import transformers.trainer
from packaging.requirements import Requirement
from packaging.version import Version

import progtuning
from progtuning.runs.checkpoints import ProgtuningTrainer

# ProgtuningTrainer's own helpers and state, not the Trainer's: they must NOT exist on the Trainer
# (or they would silently replace one of its methods or attributes).
OWN = {"_plain_state", "_rng_name", "_distributed", "_staging_root", "_seal", "_lr_scheduler_factory"}

TRAINER_SOURCE = inspect.getsource(transformers.trainer)


def _class_tree() -> ast.ClassDef:
    return ast.parse(textwrap.dedent(inspect.getsource(ProgtuningTrainer))).body[0]


def _attributes_on(tree: ast.AST, owner: str) -> set[str]:
    """Attribute names read or written on ``self`` (owner "self") or on ``super()`` (owner "super")."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if owner == "self" and isinstance(value, ast.Name) and value.id == "self":
            names.add(node.attr)
        if owner == "super" and isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
            names.add(node.attr)
    return names


def _assigned_on_self(tree: ast.AST) -> set[str]:
    targets = [t for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    return {t.attr for t in targets if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self"}


def _on_trainer(name: str) -> bool:
    """A Trainer method or class attribute, or an instance attribute the Trainer's own code uses."""
    return hasattr(transformers.Trainer, name) or f"self.{name}" in TRAINER_SOURCE


def test_transformers_is_pinned_below_the_next_major_version():
    pyproject = Path(progtuning.__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    spec = Requirement(re.search(r'"(transformers[^"]*)"', pyproject.read_text()).group(1))
    installed = Version(transformers.__version__)
    assert installed in spec.specifier, f"transformers {installed} is outside {spec.specifier}"
    assert Version(f"{installed.major + 1}.0") not in spec.specifier  # the next major is excluded
    assert Version(f"{installed.major}.99") in spec.specifier


def test_every_private_trainer_name_progtuning_overrides_still_exists():
    private = {n for n in vars(ProgtuningTrainer) if n.startswith("_") and not n.startswith("__")}
    overrides = private - OWN
    assert overrides, "ProgtuningTrainer overrides nothing: is OWN out of date?"
    missing = sorted(n for n in overrides if not hasattr(transformers.Trainer, n))
    assert missing == [], (
        f"transformers {transformers.__version__} Trainer has no {missing}: the override is dead "
        "(or, if it is progtuning's own helper, add it to OWN)"
    )
    # the Trainer calls each override with its own arguments: the parameter lists must agree
    for name in overrides:
        ours, theirs = inspect.signature(getattr(ProgtuningTrainer, name)), inspect.signature(getattr(transformers.Trainer, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{name}{ours} vs Trainer.{name}{theirs}"


def test_every_private_name_progtuning_reaches_on_the_trainer_still_exists():
    tree = _class_tree()
    defined = set(vars(ProgtuningTrainer))
    through_self = {n for n in _attributes_on(tree, "self") if n.startswith("_")} - defined - OWN
    through_super = _attributes_on(tree, "super") - {"__init__"}  # super()._save(...) and the like
    assert {"_save", "_save_checkpoint", "_get_output_dir"} <= through_super  # the walk finds what is there
    missing = sorted(n for n in through_self if not _on_trainer(n))
    missing += sorted(n for n in through_super if not hasattr(transformers.Trainer, n))  # methods of the class
    assert missing == [], f"transformers {transformers.__version__} Trainer has no {missing}"


def test_attributes_progtuning_sets_are_ones_the_trainer_reads():
    # model_accepts_loss_kwargs = False is what keeps the loss a batch mean: a renamed flag would be ignored
    assigned = _assigned_on_self(_class_tree()) - OWN
    assert "model_accepts_loss_kwargs" in assigned
    missing = sorted(n for n in assigned if f"self.{n}" not in TRAINER_SOURCE)
    assert missing == [], f"transformers {transformers.__version__} Trainer never reads {missing}"


def test_progtuning_own_helpers_do_not_shadow_the_trainer():
    assert OWN <= set(vars(ProgtuningTrainer)) | _assigned_on_self(_class_tree()), "OWN lists a name that is gone"
    shadowing = sorted(n for n in OWN if _on_trainer(n))
    assert shadowing == [], f"transformers {transformers.__version__} Trainer now has {shadowing} too: rename ours"


def test_every_name_imported_from_transformers_exists():
    """Lazy imports (e.g. the CUDA-only RNG restore) never run on a CPU test machine: check them all."""
    source_root = Path(progtuning.__file__).resolve().parent
    missing = []
    for path in sorted(source_root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert missing == []
