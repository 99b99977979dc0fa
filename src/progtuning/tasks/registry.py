"""From a task name to a :class:`~progtuning.tasks.base.Task` and its data: which source serves it.

Sources, asked in this order:

* ``dataset`` set → a hub dataset by name, through ``datasets.load_dataset`` (:mod:`progtuning.tasks.hub_datasets`);
* ``causal-lm`` / ``instruct`` → the user's plain-text or instruction files (:mod:`progtuning.tasks.lmfiles`);
* a built-in language-model task (``sms-spam-instruct``, ``movie-dialog``, ...) → :mod:`progtuning.tasks.builtin_lm`;
* ``files`` (or any config with ``train_file``) → the user's CSV/TSV/JSONL (:mod:`progtuning.tasks.textfiles`);
* a built-in name (``rotten-tomatoes``, ``trec6``, ...) → the offline packages (:mod:`progtuning.tasks.builtin`);
* a GLUE name (``sst2``, ``mnli``, ...) → the hub or ``data_dir`` (:mod:`progtuning.tasks.glue`);
* ``squad`` / ``squad_v2`` → the hub or ``data_dir`` (:mod:`progtuning.tasks.squad`).

Each source returns a task of one kind (classification, regression, extractive QA, causal LM) and a
``datasets.DatasetDict``; this module subsamples it as the config asks and checks it, so the
runner gets data that fits the task or a one-line error. Sources import nothing from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from progtuning.errors import ProgtuningError
from progtuning.tasks.names import unknown_task_error

if TYPE_CHECKING:
    from datasets import DatasetDict

    from progtuning.tasks.base import Task


def load_task(config: Any) -> tuple[Task, DatasetDict]:
    """The task and its (subsampled, checked) splits for a :class:`~progtuning.runs.config.TrainConfig`.

    Reads ``task``, ``data_dir``, the ``*_file`` / ``*_column`` / ``label_names`` / ``num_labels``
    / ``task_type`` keys of task ``files``, ``max_train_examples``, ``max_eval_examples`` and ``seed``.
    """
    from progtuning.tasks import builtin, builtin_lm, glue, lmfiles, squad, textfiles

    name = config.task
    sampled = False  # built-in tasks subsample stratified, inside their source
    lm_settings = dict(packing=config.packing, max_new_tokens=config.max_new_tokens,
                       generate_examples=config.generate_examples)
    if getattr(config, "dataset", None):
        from progtuning.tasks.hub_datasets import load_hub_dataset

        task, data = load_hub_dataset(config.dataset, config.dataset_config, **_table_settings(config))
    elif name in lmfiles.LM_FILE_TASKS:
        if not config.train_file:
            raise ProgtuningError(f"task {name!r} needs --train-file PATH ({'.txt or .jsonl' if name == 'causal-lm' else '.jsonl'})")
        task, data = lmfiles.load_lm_files(
            name, config.train_file, config.validation_file, config.test_file,
            text_column=config.text_column, **lm_settings,
        )
    elif name in builtin_lm.BUILTIN_LM_TASKS:
        task, data = builtin_lm.load_builtin_lm(
            name, config.max_train_examples, config.max_eval_examples, seed=config.seed, **lm_settings
        )
        sampled = True
    elif name == "files" or config.train_file:
        if not config.train_file:
            raise ProgtuningError("task 'files' needs --train-file PATH (CSV, TSV or JSONL)")
        task, data = textfiles.load_text_files(
            config.train_file, validation=config.validation_file, test=config.test_file,
            skip_bad_rows=getattr(config, "skip_bad_rows", False), **_table_settings(config),
        )
    elif name in builtin.BUILTIN_TASKS:
        # Stratified subsets; the evaluation subset is drawn with a fixed seed, so runs with
        # different seeds are scored on the same examples.
        task, data = builtin.load_builtin(name, config.max_train_examples, config.max_eval_examples, seed=config.seed)
        sampled = True
    elif glue.is_glue_task(name):
        task, data = glue.load_glue(name, data_dir=config.data_dir)
    elif squad.is_squad(name):
        task, data = squad.squad_task(name), squad.load_squad(squad.SQUAD_TASKS[name.lower()], config.data_dir)
    else:
        raise unknown_task_error(name)
    if not sampled:
        data = subsample_splits(data, config.max_train_examples, config.max_eval_examples, config.seed)
    task.check(data)
    return task, data


def _table_settings(config: Any) -> dict[str, Any]:
    """How a table (a hub dataset or the user's files) maps onto a text task: read only for those
    sources, so a config for another source (a benchmark's, say) need not carry the keys."""
    return dict(
        text_column=config.text_column, text_pair_column=config.text_pair_column,
        label_column=config.label_column, task_type=config.task_type, label_names=config.label_names,
        num_labels=config.num_labels,
    )


def task_source(config: Any) -> str:
    """Which source :func:`load_task` reads ``config``'s task from: ``hub``, ``lm_files``, ``builtin_lm``,
    ``files``, ``builtin``, ``glue`` or ``squad`` (the same order as there). Saved with a run, it lets
    :func:`progtuning.tasks.spec.task_from_spec` rebuild the task without its data."""
    from progtuning.tasks import builtin, builtin_lm, glue, lmfiles, squad

    if getattr(config, "dataset", None):
        return "hub"
    # language-model tasks: the saved spec names them; predict/evaluate do not rebuild them yet
    if config.task in lmfiles.LM_FILE_TASKS:
        return "lm_files"
    if config.task in builtin_lm.BUILTIN_LM_TASKS:
        return "builtin_lm"
    if config.task == "files" or config.train_file:
        return "files"
    if config.task in builtin.BUILTIN_TASKS:
        return "builtin"
    if glue.is_glue_task(config.task):
        return "glue"
    if squad.is_squad(config.task):
        return "squad"
    raise ProgtuningError(f"unknown task {config.task!r}")


def subsample_splits(data: DatasetDict, max_train: int | None, max_eval: int | None, seed: int) -> DatasetDict:
    """Seeded random subsets: ``max_train`` rows of train, ``max_eval`` of every other split."""
    from datasets import DatasetDict

    out = {}
    for split, dataset in data.items():
        limit = max_train if split == "train" else max_eval
        if limit is not None and len(dataset) > limit:
            dataset = dataset.shuffle(seed=seed).select(range(limit))
        out[split] = dataset
    return DatasetDict(out)
