"""The package as installed: a light ``import progtuning``, a CLI that answers without torch, and every
imported package declared (core dependencies or an extra).

Imports are checked in fresh subprocesses (this test process has imported everything already).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import progtuning

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _fresh(code: str) -> list:
    """Run ``code`` in a new interpreter with this checkout first on the path; it prints one JSON value."""
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "transformers", "transformers.trainer", "datasets", "matplotlib", "peft", "sklearn", "scipy")


def test_import_progtuning_loads_nothing_heavy():
    loaded = _fresh(f"import sys, json, progtuning; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


def test_the_public_api_resolves_on_first_use():
    assert sorted(progtuning.__all__) == sorted(progtuning._EXPORTS)
    for name in progtuning.__all__:
        assert getattr(progtuning, name) is not None and name in dir(progtuning)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        progtuning.nothing  # noqa: B018


@pytest.mark.slow
def test_the_core_api_pulls_in_neither_the_trainer_nor_datasets_nor_matplotlib():
    loaded = _fresh(
        "import sys, json\n"
        "from progtuning import ProgtuningCallback, ProgressiveFreezer, progressive, find_blocks, StageTelemetry\n"
        f"print(json.dumps([m for m in {HEAVY[2:]!r} if m in sys.modules]))"
    )
    assert "transformers.trainer" not in loaded and "datasets" not in loaded and "matplotlib" not in loaded


def test_the_cli_answers_help_models_and_config_errors_without_torch():
    code = (
        "import sys, json, contextlib, io\n"
        "from progtuning.runs.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', '--help'], ['models'], ['train', '--epochs', 'x']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            codes.append(main(argv))\n"
        "        except SystemExit as stop:\n"
        "            codes.append(stop.code)\n"
        "print(json.dumps([codes, [m for m in ('torch', 'transformers') if m in sys.modules]]))"
    )
    codes, loaded = _fresh(code)
    assert codes == [0, 0, 0, 0, 2] and loaded == []


@pytest.mark.slow
def test_the_core_works_without_any_optional_package():
    """Callback, freezer, accounting and plan with peft, datasets, sklearn, scipy, pandas, matplotlib, rich gone."""
    code = (
        "import sys, json\n"
        "for name in ('peft', 'datasets', 'sklearn', 'scipy', 'pandas', 'matplotlib', 'rich'):\n"
        "    sys.modules[name] = None  # import fails; find_spec says it is not installed\n"
        "import transformers\n"
        "from transformers import Trainer\n"
        "from progtuning import ProgtuningCallback, ProgressiveFreezer, find_blocks, plan_updates, progressive\n"
        "from progtuning.runs.plan import build_plan\n"
        "config = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,\n"
        "                                 intermediate_size=64, vocab_size=100)\n"
        "model = transformers.BertForSequenceClassification(config)\n"
        "freezer = ProgressiveFreezer(model, progressive(find_blocks(model).num_blocks, 2))\n"
        "print(json.dumps([plan_updates(freezer, 2).reduction_blocks_only, build_plan('minilm-l6')['num_blocks']]))"
    )
    assert _fresh(code) == [0.25, 6]


def test_a_missing_optional_package_names_its_extra(capsys, monkeypatch, tmp_path):
    from progtuning.runs import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    fixtures = Path(__file__).parent / "fixtures" / "results"
    assert cli.main(["report", str(fixtures), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install 'progtuning[report]'" in err and "\n" not in err


# -- every imported package is declared ---------------------------------------------------------------------
def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """Core distributions, and each extra's distributions (extras it names, ``progtuning[cli]``, expanded)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for requirement in requirements:
            if requirement.startswith("progtuning["):
                for inner in requirement[len("progtuning["):].rstrip("]").split(","):
                    out |= names(project["optional-dependencies"][inner])
            else:
                out.add(re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
        return out

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _imported_top_level_modules() -> set[str]:
    found = set()
    for path in (SRC / "progtuning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"progtuning"}


def test_every_imported_package_is_declared():
    core, extras = _declared()
    distributions = importlib.metadata.packages_distributions()
    every_extra = set().union(*extras.values())
    for module in sorted(_imported_top_level_modules()):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert dists & (core | every_extra), f"{module} ({dists}) is imported but not declared in pyproject.toml"


def test_the_cli_names_extras_that_exist():
    from progtuning.runs.cli import EXTRAS

    core, extras = _declared()
    distributions = importlib.metadata.packages_distributions()
    for module, extra in EXTRAS.items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert extra in extras and dists & extras[extra], (module, extra)
        assert not dists & core, f"{module} is a core dependency, not optional"
