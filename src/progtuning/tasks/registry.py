"""From a task name to a :class:`~progtuning.tasks.base.Task` and its data: which source serves it.

Sources, asked in this order:

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

if TYPE_CHECKING:
    from datasets import DatasetDict

    from progtuning.tasks.base import Task


def load_task(config: Any) -> tuple[Task, DatasetDict]:
    """The task and its (subsampled, checked) splits for a :class:`~progtuning.runs.config.TrainConfig`.

    Reads ``task``, ``data_dir``, the ``*_file`` / ``*_column`` / ``label_names`` / ``num_labels``
    / ``task_type`` keys of task ``files``, ``max_train_examples``, ``max_eval_examples`` and ``seed``;
    language-model tasks also ``packing``, ``max_new_tokens`` and ``generate_examples``.
    """
    from progtuning.tasks import builtin, builtin_lm, glue, lmfiles, squad, textfiles

    name = config.task
    sampled = False  # built-in tasks subsample stratified, inside their source
    lm_settings = dict(packing=getattr(config, "packing", None), max_new_tokens=getattr(config, "max_new_tokens", 32),
                       generate_examples=getattr(config, "generate_examples", 100))
    if name in lmfiles.LM_FILE_TASKS:
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
            config.train_file,
            validation=config.validation_file,
            test=config.test_file,
            text_column=config.text_column,
            text_pair_column=config.text_pair_column,
            label_column=config.label_column,
            task_type=config.task_type,
            label_names=config.label_names,
            num_labels=config.num_labels,
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
        raise ProgtuningError(
            f"unknown task {name!r}: use a built-in task ({', '.join(builtin.BUILTIN_TASKS + builtin_lm.BUILTIN_LM_TASKS)}), "
            f"a GLUE task ({', '.join(glue.GLUE_TASKS)}), squad, squad_v2, 'files' with --train-file, "
            "or causal-lm / instruct with --train-file"
        )
    if not sampled:
        data = subsample_splits(data, config.max_train_examples, config.max_eval_examples, config.seed)
    task.check(data)
    return task, data


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
