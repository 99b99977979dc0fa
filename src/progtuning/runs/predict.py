"""``progtuning predict`` and ``progtuning evaluate``: a saved run on new data, through its task.

    progtuning predict RUN_DIR --file new.csv            # → new.predictions.csv: label + probabilities
    progtuning evaluate RUN_DIR --file labelled.jsonl    # the task's metric on this file

A run folder written by ``progtuning train`` holds ``results.json`` (the config) and ``model/``: what
the method trained (``progtuning_method.json``), the tokenizer and the task
(:data:`~progtuning.tasks.spec.TASK_FILE`). :func:`load_run` rebuilds the model on its base model
(LoRA, adapters and BitFit need it: an alias, folder or hub id, as in training) and the task from
its spec; everything task-specific after that is the :class:`~progtuning.tasks.base.Task` interface:
``examples_from_table`` checks the file's columns and maps its labels, ``features_for`` tokenizes,
``predictions`` / ``evaluate`` run the model. Files are read as ``progtuning train`` reads them
(:mod:`progtuning.tasks.textfiles`: CSV, TSV, JSONL by extension).

Predictions go to ``--out`` (default: beside the input, ``NAME.predictions.EXT``), in the input's
format: every input column, then ``prediction`` and, for classes, one ``prob_<label>`` column per
class (JSONL: a ``probabilities`` object); extractive QA adds ``answer``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from progtuning.errors import ProgtuningError

# Trainer bookkeeping in evaluate()'s result that is not a score
_NOT_SCORES = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


@dataclass
class LoadedRun:
    """A trained run, ready to predict."""

    run_dir: Path
    config: dict
    spec: dict
    task: Any
    model: Any
    tokenizer: Any


def load_run_task(run_dir: str | Path) -> tuple[dict, dict, Any]:
    """The run's config, task spec and task (no weights loaded yet: a file is checked against it first)."""
    from progtuning.methods.api import METHOD_FILE
    from progtuning.runs.results import MODEL_DIR, RESULTS_FILE
    from progtuning.tasks.spec import load_task_spec, task_from_spec

    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR
    if not (run_dir / RESULTS_FILE).is_file() or not (model_dir / METHOD_FILE).is_file():
        raise ProgtuningError(
            f"{run_dir} is not a finished run with a saved model ({RESULTS_FILE} and {MODEL_DIR}/{METHOD_FILE}): "
            "give the output folder of `progtuning train`"
        )
    config = json.loads((run_dir / RESULTS_FILE).read_text())["config"]
    spec = load_task_spec(model_dir)
    return config, spec, task_from_spec(spec)


def load_run(run_dir: str | Path) -> LoadedRun:
    """The model, tokenizer, task and config of the run in ``run_dir`` (one-line errors)."""
    from transformers import AutoTokenizer

    from progtuning.methods.api import METHOD_FILE, load_method
    from progtuning.methods.config import MethodConfig
    from progtuning.runs.results import MODEL_DIR

    config, spec, task = load_run_task(run_dir)
    model_dir = Path(run_dir) / MODEL_DIR
    method = MethodConfig.load(model_dir / METHOD_FILE)
    base: Any = model_dir
    if method.name != "full":  # the method's weights go on top of the base model it was trained from
        from progtuning.runs.models import resolve_model

        base = resolve_model(config["model"])
    model = load_method(base, model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return LoadedRun(Path(run_dir), config, spec, task, model, tokenizer)


def read_table(path: str | Path) -> Any:
    """The file as a pandas ``DataFrame``, read as ``progtuning train`` reads its files."""
    from progtuning.tasks.textfiles import _read

    return _read(path, "input")


def predict_file(run_dir: str | Path, file: str | Path, out: str | Path | None = None, *,
                 batch_size: int | None = None, overwrite: bool = False) -> tuple[Path, int]:
    """Predict every row of ``file``; returns (the predictions file, rows written)."""
    out = Path(out) if out else default_output(file)
    if out.exists() and not overwrite:
        raise ProgtuningError(f"{out} exists: pass --overwrite to replace it, or --out another file")
    _format(out)  # an unknown extension is refused before the model loads
    table = read_table(file)
    _, _, task = load_run_task(run_dir)
    task.examples_from_table(table, None, f"file '{file}'")  # the columns, before the weights load
    run = load_run(run_dir)
    examples = run.task.examples_from_table(table, None, f"file '{file}'")
    features = run.task.features_for(examples, run.tokenizer, _settings(run.config))
    with _trainer(run, batch_size) as trainer:
        rows = run.task.predictions(trainer, features, "test")
    write_predictions(table, rows, out)
    return out, len(rows)


def evaluate_file(run_dir: str | Path, file: str | Path, *, batch_size: int | None = None) -> dict[str, Any]:
    """The run's task metric on the labelled ``file``: ``{"scores": {...}, "examples": n, ...}``."""
    table = read_table(file)
    _, spec, task = load_run_task(run_dir)
    label_column = spec.get("label_column") or "label"
    task.examples_from_table(table, label_column, f"file '{file}'")  # columns and labels, before the weights load
    run = load_run(run_dir)
    examples = run.task.examples_from_table(table, label_column, f"file '{file}'")
    features = run.task.features_for(examples, run.tokenizer, _settings(run.config))
    with _trainer(run, batch_size) as trainer:
        scores = run.task.evaluate(trainer, features, "test")
    scores = {k: v for k, v in scores.items() if k not in _NOT_SCORES}
    return {"task": run.task.name, "file": str(file), "examples": len(examples), "main_metric": run.task.main_metric,
            "scores": scores}


def default_output(file: str | Path) -> Path:
    file = Path(file)
    return file.with_name(f"{file.stem}.predictions{file.suffix}")


def _format(path: Path) -> str:
    formats = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise ProgtuningError(f"cannot tell the format of '{path}': name it .csv, .tsv or .jsonl")
    return fmt


def _settings(config: dict) -> SimpleNamespace:
    """The run's settings as tokenizing reads them (max_length; doc_stride for QA)."""
    return SimpleNamespace(**config)


@contextmanager
def _trainer(run: LoadedRun, batch_size: int | None):
    """A Trainer that only predicts; its output folder is a temporary one."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="progtuning-predict-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size or run.config.get("eval_batch_size") or 64,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=run.model, args=args, data_collator=run.task.collator(run.tokenizer),
                          processing_class=run.tokenizer, compute_metrics=run.task.trainer_metrics())
        trainer.remove_callback(PrinterCallback)  # the scores are printed once, by the command
        yield trainer


def write_predictions(table: Any, rows: list[dict], out: Path) -> None:
    """The input rows with their predictions, in ``out``'s format (written atomically)."""
    fmt = _format(out)
    records = table.to_dict(orient="records")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                for record, row in zip(records, rows):
                    f.write(json.dumps({**_plain(record), **row}, ensure_ascii=False) + "\n")
            else:
                flat = [{**_plain(record), **_flatten(row)} for record, row in zip(records, rows)]
                _write_table(f, flat, "," if fmt == "csv" else "\t")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flatten(row: dict) -> dict:
    """``{"probabilities": {"pos": 0.9}}`` → ``{"prob_pos": 0.9}`` for a CSV/TSV column each."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"prob_{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def _plain(record: dict) -> dict:
    """pandas' NaN (an empty cell) as None, numpy scalars as Python values."""
    out = {}
    for key, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and value != value:
            value = None
        out[str(key)] = value
    return out


def _write_table(f, rows: list[dict], delimiter: str) -> None:
    import csv

    columns = list(rows[0]) if rows else []
    if delimiter == ",":
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    # TSV as progtuning reads it: no quoting (a tab or newline inside a cell becomes a space)
    def cell(value: Any) -> str:
        return "" if value is None else " ".join(str(value).replace("\t", " ").splitlines())

    f.write("\t".join(columns) + "\n")
    for row in rows:
        f.write("\t".join(cell(row.get(c)) for c in columns) + "\n")
