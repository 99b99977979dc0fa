"""Task names: the light table the config checks agrees with every source, and a mistyped name
fails before the heavy imports (datasets, scikit-learn, torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.config import load_config
from progtuning.tasks import builtin, builtin_lm, glue, lmfiles, names, squad


def test_the_name_tables_match_the_sources():
    assert names.BUILTIN_TASKS == builtin.BUILTIN_TASKS
    assert names.BUILTIN_LM_TASKS == builtin_lm.BUILTIN_LM_TASKS
    assert set(names.LM_FILE_TASKS) == set(lmfiles.LM_FILE_TASKS)
    assert set(names.GLUE_TASKS) == set(glue.GLUE_TASKS)
    assert set(names.SQUAD_TASKS) == set(squad.SQUAD_TASKS)


@pytest.mark.parametrize("overrides", [
    {"task": "trec6"}, {"task": "SST-2"}, {"task": "squad_v2", "max_length": 384}, {"task": "movie-dialog"},
    {"task": "files", "train_file": "t.csv"}, {"task": "anything", "train_file": "t.csv"},
    {"task": "my-hub-task", "dataset": "imdb"},
])
def test_every_source_accepts_its_names(overrides):
    assert load_config(None, overrides).task == overrides["task"]


def test_a_mistyped_task_is_one_line_that_lists_the_names():
    with pytest.raises(ProgtuningError, match=r"unknown task 'rotten-tomatos': use a built-in task \(rotten-tomatoes,"):
        load_config(None, {"task": "rotten-tomatos"})


def test_a_mistyped_task_fails_before_the_heavy_imports():
    code = (
        "import sys\n"
        "from progtuning.runs.cli import main\n"
        "assert main(['train', '--task', 'rotten-tomatos']) != 0\n"
        "heavy = sorted({'datasets', 'sklearn', 'torch', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "unknown task 'rotten-tomatos'" in done.stderr + done.stdout
