"""The nine GLUE tasks: their columns, labels and official metrics, and loading their data.

:func:`glue_task` describes a task as a :class:`~progtuning.tasks.classification.ClassificationTask`
(STS-B: :class:`~progtuning.tasks.regression.RegressionTask`); :func:`load_glue`
returns that task with its data as a ``datasets.DatasetDict`` shaped like the Hub's ``glue``
dataset (HF column names, ``label`` ids, ``idx``), read either from the Hub or offline from GLUE's
own distributed TSV files (or HF's parquet/JSON exports of them).

Splits: ``train`` and ``validation`` (MNLI: ``validation`` is *matched*, plus
``validation_mismatched``). GLUE's test labels are hidden, so a ``test`` split appears only when
the test file really has labels (MRPC's ``msr_paraphrase_test.txt`` does).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from progtuning.errors import ProgtuningError
from progtuning.tasks.classification import ClassificationTask
from progtuning.tasks.metrics import MetricFn, accuracy, f1_and_accuracy, matthews, pearson_and_spearmanr
from progtuning.tasks.names import glue_key as _key
from progtuning.tasks.regression import RegressionTask
from progtuning.tasks.text import TextTask

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

__all__ = ["GLUE_TASKS", "glue_task", "is_glue_task", "load_glue"]


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class _GlueSpec:
    name: str
    folder: str  # the task's folder in GLUE's download
    text_columns: tuple[str, ...]  # HF `glue` column names
    label_names: tuple[str, ...] | None  # None: regression
    metric: MetricFn
    main_metric: str
    # GLUE TSV layout: HF column -> TSV header name, or -> position for the header-less CoLA files
    tsv_columns: dict[str, str | int]
    tsv_label: str | int
    tsv_files: dict[str, tuple[str, ...]]  # split -> candidate file names, first existing wins
    description: str


_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, _GlueSpec] = {
    spec.name: spec
    for spec in [
        _GlueSpec(
            "cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), matthews,
            "matthews_correlation",
            tsv_columns={"sentence": 3}, tsv_label=1,
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="CoLA: is the sentence grammatical? Matthews correlation.",
        ),
        _GlueSpec(
            "sst2", "SST-2", ("sentence",), ("negative", "positive"), accuracy, "accuracy",
            tsv_columns={"sentence": "sentence"}, tsv_label="label",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="SST-2: movie review sentence sentiment. Accuracy.",
        ),
        _GlueSpec(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
            f1_and_accuracy, "f1",
            tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String"}, tsv_label="Quality",
            tsv_files={
                "train": ("train.tsv",),
                "validation": ("dev.tsv",),
                # the public MSR test file is labelled; GLUE's own test.tsv is not
                "test": ("msr_paraphrase_test.txt", "test.tsv"),
            },
            description="MRPC: are the two sentences paraphrases? F1 (main) and accuracy.",
        ),
        _GlueSpec(
            "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
            f1_and_accuracy, "f1",
            tsv_columns={"question1": "question1", "question2": "question2"},
            tsv_label="is_duplicate",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="QQP: are the two Quora questions duplicates? F1 (main) and accuracy.",
        ),
        _GlueSpec(
            "stsb", "STS-B", ("sentence1", "sentence2"), None, pearson_and_spearmanr, "pearson",
            tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2"}, tsv_label="score",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="STS-B: similarity score 0-5 (regression). Pearson (main) and Spearman.",
        ),
        _GlueSpec(
            "mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
            accuracy, "accuracy",
            tsv_columns={"premise": "sentence1", "hypothesis": "sentence2"},
            tsv_label="gold_label",
            tsv_files={
                "train": ("train.tsv",),
                "validation": ("dev_matched.tsv",),
                "validation_mismatched": ("dev_mismatched.tsv",),
                "test": ("test_matched.tsv",),
                "test_mismatched": ("test_mismatched.tsv",),
            },
            description="MNLI: entailment, neutral or contradiction. Accuracy on matched "
            "(validation) and mismatched (validation_mismatched).",
        ),
        _GlueSpec(
            "qnli", "QNLI", ("question", "sentence"), _NLI, accuracy, "accuracy",
            tsv_columns={"question": "question", "sentence": "sentence"}, tsv_label="label",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="QNLI: does the sentence answer the question? Accuracy.",
        ),
        _GlueSpec(
            "rte", "RTE", ("sentence1", "sentence2"), _NLI, accuracy, "accuracy",
            tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2"}, tsv_label="label",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="RTE: does sentence1 entail sentence2? Accuracy.",
        ),
        _GlueSpec(
            # WNLI's files say 1 for entailment, hence the reversed order of names
            "wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
            accuracy, "accuracy",
            tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2"}, tsv_label="label",
            tsv_files={"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)},
            description="WNLI: does the sentence with the pronoun replaced follow? Accuracy.",
        ),
    ]
}


def _spec(name: str) -> _GlueSpec:
    spec = GLUE_TASKS.get(_key(str(name)))
    if spec is None:
        raise ProgtuningError(f"unknown GLUE task {name!r}; use one of: {', '.join(GLUE_TASKS)}")
    return spec


def is_glue_task(name: str) -> bool:
    """Whether ``name`` names a GLUE task, in any of the accepted spellings ("SST-2", "sst2", ...)."""
    return _key(str(name)) in GLUE_TASKS


def glue_task(name: str) -> TextTask:
    """The :class:`TextTask` of a GLUE task (``"cola"``, ``"SST-2"``, ``"mnli"``, ...)."""
    spec = _spec(name)
    common = dict(
        name=spec.name,
        text_columns=spec.text_columns,
        metric=spec.metric,
        main_metric=spec.main_metric,
        eval_splits=("validation", "validation_mismatched") if spec.name == "mnli" else ("validation",),
        description=spec.description,
        extra={"benchmark": "glue"},
    )
    if spec.label_names is None:
        return RegressionTask(**common)
    return ClassificationTask(num_labels=len(spec.label_names), label_names=spec.label_names, **common)


# ----------------------------------------------------------------------------- loading


def load_glue(name: str, data_dir: str | Path | None = None) -> tuple[TextTask, DatasetDict]:
    """Return ``(TextTask, DatasetDict)`` for a GLUE task.

    ``data_dir=None`` downloads from the Hugging Face Hub. Otherwise ``data_dir`` is a folder from
    GLUE's download (the task folder, e.g. ``glue_data/CoLA``, or the root ``glue_data``) with
    GLUE's ``train.tsv``/``dev.tsv`` files, or with HF exports ``train.parquet`` /
    ``validation.parquet`` (``.jsonl``/``.json`` too) that use HF's column names.
    """
    import datasets

    spec = _spec(name)
    task = glue_task(spec.name)
    if data_dir is None:
        try:
            raw = datasets.load_dataset("nyu-mll/glue", spec.name)
        except (ConnectionError, OSError) as e:
            raise ProgtuningError(
                f"could not load GLUE {spec.name!r} from the Hugging Face Hub ({e}); "
                f"pass data_dir= pointing at a GLUE download instead"
            ) from None
        return task, _normalise(spec, raw, source="the Hub")

    folder = _task_folder(spec, Path(data_dir))
    if (folder / spec.tsv_files["train"][0]).is_file() or (
        spec.name == "mrpc" and (folder / "msr_paraphrase_train.txt").is_file()
    ):
        return task, _load_tsv(spec, folder)
    exported = _exported_files(folder)
    if exported:
        fmt = "parquet" if str(next(iter(exported.values()))[0]).endswith(".parquet") else "json"
        raw = datasets.load_dataset(fmt, data_files={s: [str(p) for p in ps] for s, ps in exported.items()})
        return task, _normalise(spec, raw, source=str(folder))
    raise ProgtuningError(
        f"no GLUE {spec.name} data in {folder}: expected {spec.folder}/"
        f"{spec.tsv_files['train'][0]} (GLUE's TSV files) or train.parquet / train.jsonl (HF export)"
    )


def _task_folder(spec: _GlueSpec, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise ProgtuningError(f"GLUE data_dir {data_dir} is not a folder; point it at GLUE's download")
    # the GLUE root holds one folder per task ("SST-2"; HF exports use "sst2")
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and _key(child.name) in (_key(spec.folder), spec.name):
            return child
    return data_dir


# split names of HF exports and of the Hub (file stems like "validation_matched") -> ours
_EXPORTED_SPLITS = {
    "train": "train",
    "validation": "validation",
    "validation_matched": "validation",
    "dev": "validation",
    "validation_mismatched": "validation_mismatched",
    "test": "test",
    "test_matched": "test",
    "test_mismatched": "test_mismatched",
}


def _exported_files(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for ext in ("parquet", "jsonl", "json"):
        for stem, split in _EXPORTED_SPLITS.items():
            # "train.parquet", or the Hub's sharded "train-00000-of-00001.parquet"
            paths = sorted(folder.glob(f"{stem}.{ext}")) + sorted(folder.glob(f"{stem}-[0-9]*.{ext}"))
            if paths and split not in found:
                found[split] = paths
        if found:
            return found
    return found


def _features(spec: _GlueSpec):
    import datasets

    features = {c: datasets.Value("string") for c in spec.text_columns}
    features["label"] = (
        datasets.ClassLabel(names=list(spec.label_names)) if spec.label_names else datasets.Value("float32")
    )
    features["idx"] = datasets.Value("int32")
    return datasets.Features(features)


def _normalise(spec: _GlueSpec, raw: DatasetDict, source: str) -> DatasetDict:
    """Hub or exported data -> the splits and columns :func:`load_glue` promises."""
    import datasets

    out = {}
    for split, ds in raw.items():
        split = _EXPORTED_SPLITS.get(split, split)
        missing = [c for c in (*spec.text_columns, "label") if c not in ds.column_names]
        if missing:
            raise ProgtuningError(
                f"GLUE {spec.name} split {split!r} from {source} lacks column(s) {missing}; "
                f"it needs HF's glue columns {[*spec.text_columns, 'label']}"
            )
        if spec.label_names and ds.features["label"].dtype == "string":
            ds = ds.map(lambda row: {"label": _label_id(spec, row["label"], source)})
        if spec.label_names:
            # GLUE test labels are hidden (-1): such a split cannot be scored
            ds = ds.filter(lambda labels: [y != -1 for y in labels], input_columns="label", batched=True)
            if len(ds) == 0:
                continue
        if "idx" not in ds.column_names:
            ds = ds.add_column("idx", list(range(len(ds))))
        ds = ds.select_columns([*spec.text_columns, "label", "idx"]).cast(_features(spec))
        out[split] = ds
    if "train" not in out or "validation" not in out:
        raise ProgtuningError(
            f"GLUE {spec.name} from {source} has splits {sorted(out)}; it needs labelled "
            f"'train' and 'validation' splits"
        )
    return datasets.DatasetDict(out)


def _label_id(spec: _GlueSpec, value: str, where: str) -> int:
    assert spec.label_names is not None
    if value in spec.label_names:
        return spec.label_names.index(value)
    try:
        label = int(value)
    except ValueError:
        label = -2
    if not 0 <= label < len(spec.label_names):
        raise ProgtuningError(
            f"{where}: GLUE {spec.name} label {value!r} is not one of "
            f"{list(spec.label_names)} or 0..{len(spec.label_names) - 1}; fix or remove that row"
        )
    return label


def _read_rows(path: Path) -> list[list[str]]:
    # GLUE's TSVs contain bare quotes (e.g. 'he said "hi"'), so quoting must be off; MRPC's MSR
    # files start with a byte-order mark, which utf-8-sig drops
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _parse_rows(spec: _GlueSpec, rows: list[list[str]], path: Path, split: str) -> dict[str, list] | None:
    """The rows of one GLUE TSV file as columns; None when it has no labels (GLUE's test files)."""
    headerless = isinstance(spec.tsv_label, int)
    if headerless:
        if rows and rows[0][:1] == ["index"]:  # CoLA's test.tsv: "index\tsentence", no labels
            return None
        position = dict(spec.tsv_columns)
        label_at, first_line, body = int(spec.tsv_label), 1, rows
    else:
        header = rows[0] if rows else []
        if spec.tsv_label not in header:
            if split.startswith("test"):
                return None
            raise ProgtuningError(
                f"{path} has no {spec.tsv_label!r} column (header: {header}); "
                f"use GLUE's original {spec.folder} files"
            )
        missing = [h for h in spec.tsv_columns.values() if h not in header]
        if missing:
            raise ProgtuningError(
                f"{path} lacks column(s) {missing} (header: {header}); "
                f"use GLUE's original {spec.folder} files"
            )
        position = {c: header.index(h) for c, h in spec.tsv_columns.items()}
        label_at, first_line, body = header.index(spec.tsv_label), 2, rows[1:]

    width = max([*position.values(), label_at]) + 1
    columns: dict[str, list] = {c: [] for c in (*spec.text_columns, "label", "idx")}
    skipped = 0
    for line, row in enumerate(body, start=first_line):
        if not row:  # a blank line
            continue
        label = row[label_at].strip() if len(row) >= width else ""
        # a few GLUE rows are broken (QQP has short rows; MNLI marks no-consensus pairs "-"),
        # and the Hub's glue loader drops them too
        if label in ("", "-"):
            skipped += 1
            continue
        for column, at in position.items():
            columns[column].append(row[at])
        if spec.label_names:
            columns["label"].append(_label_id(spec, label, f"{path} line {line}"))
        else:
            try:
                columns["label"].append(float(label))
            except ValueError:
                raise ProgtuningError(
                    f"{path} line {line}: score {label!r} is not a number; fix or remove that row"
                ) from None
        columns["idx"].append(len(columns["idx"]))
    if skipped:
        logger.warning("%s: skipped %d row(s) without a label or with missing fields", path, skipped)
    return columns


def _mrpc_split_msr(folder: Path) -> tuple[dict | None, dict | None]:
    """Split ``msr_paraphrase_train.txt`` into train and dev by ``dev_ids.tsv``, as GLUE's
    download script does."""
    spec = GLUE_TASKS["mrpc"]
    ids_path = folder / "dev_ids.tsv"
    if not ids_path.is_file():
        raise ProgtuningError(
            f"{folder} has msr_paraphrase_train.txt but no dev_ids.tsv to split off the dev set; "
            f"add GLUE's dev_ids.tsv or use GLUE's train.tsv and dev.tsv"
        )
    dev_ids = {tuple(row[:2]) for row in _read_rows(ids_path) if len(row) >= 2}
    path = folder / "msr_paraphrase_train.txt"
    rows = _read_rows(path)
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    if "#1 ID" not in header or "#2 ID" not in header:
        raise ProgtuningError(f"{path} has no '#1 ID' / '#2 ID' columns (header: {header}); use the MSR original")
    id1, id2 = header.index("#1 ID"), header.index("#2 ID")
    parts = {"train": [header], "validation": [header]}
    for row in body:
        parts["validation" if tuple(row[i] for i in (id1, id2)) in dev_ids else "train"].append(row)
    return (
        _parse_rows(spec, parts["train"], path, "train"),
        _parse_rows(spec, parts["validation"], path, "validation"),
    )


def _load_tsv(spec: _GlueSpec, folder: Path) -> DatasetDict:
    import datasets

    splits: dict[str, dict] = {}
    if spec.name == "mrpc" and not (folder / "train.tsv").is_file():
        splits["train"], splits["validation"] = _mrpc_split_msr(folder)
    for split, names in spec.tsv_files.items():
        if split in splits:
            continue
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            if split.startswith("test"):
                continue
            raise ProgtuningError(
                f"GLUE {spec.name}: missing {folder / names[0]}; "
                f"copy all of GLUE's {spec.folder} files into {folder}"
            )
        columns = _parse_rows(spec, _read_rows(path), path, split)
        if columns is not None and columns["idx"]:
            splits[split] = columns
    features = _features(spec)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(cols, features=features) for split, cols in splits.items()}
    )
