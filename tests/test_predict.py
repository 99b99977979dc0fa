"""``progtuning predict`` / ``evaluate``: a saved tiny run on new files, through its Task.

The fast tests use the Task interface on its own (spec round trip, a user's table, label mapping,
prediction rows); the slow ones round-trip a trained tiny run: evaluate on its own validation file
gives the score results.json recorded, predict writes every row with probabilities in each format,
and a file with other columns is refused in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from progtuning.errors import ProgtuningError
from progtuning.runs.cli import main
from progtuning.tasks.builtin import builtin_task
from progtuning.tasks.glue import glue_task
from progtuning.tasks.spec import task_from_spec, task_spec
from progtuning.tasks.squad import squad_task
from progtuning.tasks.textfiles import load_text_files

FIXTURES = Path(__file__).parent / "fixtures" / "textfiles"


@pytest.mark.parametrize("task, source", [
    (builtin_task("trec6"), "builtin"), (builtin_task("rotten-tomatoes-rating"), "builtin"),
    (glue_task("cola"), "glue"), (glue_task("mnli"), "glue"), (squad_task("squad_v2"), "squad"),
])
def test_a_task_is_rebuilt_from_its_spec_with_the_same_metric(task, source):
    rebuilt = task_from_spec(json.loads(json.dumps(task_spec(task, source))))
    assert (type(rebuilt), rebuilt.name, rebuilt.main_metric) == (type(task), task.name, task.main_metric)
    assert getattr(rebuilt, "metric", None) is getattr(task, "metric", None) or rebuilt.kind == "classification"
    assert getattr(rebuilt, "label_names", None) == getattr(task, "label_names", None)


def test_a_users_file_task_is_rebuilt_from_its_recorded_labels(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("review,stars\ngood,5\nbad,1\nfine,3\nok,3\ngreat,5\nawful,1\n")
    task, _ = load_text_files(train, text_column="review", label_column="stars")
    spec = task_spec(task, "files", "stars")
    rebuilt = task_from_spec(json.loads(json.dumps(spec)))
    assert rebuilt.label_names == ("1", "3", "5") and rebuilt.text_columns == ("review",)
    assert spec["label_column"] == "stars"
    logits = np.array([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])
    assert rebuilt.metric(logits, np.array([2, 1])) == task.metric(logits, np.array([2, 1]))


def test_a_table_becomes_the_tasks_rows_or_a_one_line_error():
    task = builtin_task("rotten-tomatoes")
    rows = task.examples_from_table(pd.DataFrame({"text": ["a", "b", "c"], "label": ["positive", 0, "1"]}),
                                    "label", "file 'x.csv'")
    assert rows["label"] == [1, 0, 1] and rows["text"] == ["a", "b", "c"]
    unlabelled = task.examples_from_table(pd.DataFrame({"text": ["a"], "other": [1]}), None, "file 'x.csv'")
    assert unlabelled.column_names == ["text"]
    with pytest.raises(ProgtuningError, match=r"^file 'x.csv' has no column\(s\) text \(it has: review\): this run reads text$"):
        task.examples_from_table(pd.DataFrame({"review": ["a"]}), None, "file 'x.csv'")
    with pytest.raises(ProgtuningError, match=r"label 'neutral' in file 'x.csv' is not one of this run's labels \(negative, positive\)"):
        task.examples_from_table(pd.DataFrame({"text": ["a"], "label": ["neutral"]}), "label", "file 'x.csv'")
    with pytest.raises(ProgtuningError, match="row 2 has an empty 'text'"):
        task.examples_from_table(pd.DataFrame({"text": ["a", None]}), None, "file 'x.csv'")
    with pytest.raises(ProgtuningError, match="is not a number"):
        builtin_task("rotten-tomatoes-rating").examples_from_table(
            pd.DataFrame({"text": ["a"], "label": ["high"]}), "label", "file 'x.csv'")


def test_prediction_rows_name_the_label_and_give_probabilities_that_sum_to_one():
    rows = builtin_task("trec6").prediction_rows(np.array([[0.0, 5.0, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 1]]))
    names = builtin_task("trec6").label_names
    assert rows[0]["prediction"] == names[1] and list(rows[0]["probabilities"]) == list(names)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)  # 6 values rounded to 1e-6 each
    assert builtin_task("rotten-tomatoes-rating").prediction_rows(np.array([[0.25], [-1.5]])) == [
        {"prediction": 0.25}, {"prediction": -1.5}]


def test_a_task_kind_without_reuse_says_so_in_one_line():
    from progtuning.tasks.base import Task

    class Kind(Task):
        kind = "new_kind"

        def check(self, data): ...
        def preprocess(self, data, tokenizer, settings): ...
        def collator(self, tokenizer): ...
        def model_class(self): ...
        def evaluate(self, trainer, features, split): ...

    with pytest.raises(ProgtuningError, match="new_kind tasks cannot predict or evaluate a new file yet"):
        Kind().input_columns()


# ------------------------------------------------------------------------ a trained tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tiny_run import make_tiny_setup, train_argv

    root = tmp_path_factory.mktemp("predict")
    model_dir, data_dir = make_tiny_setup(root)
    out = root / "run"
    assert main(train_argv(model_dir, data_dir, out, "--epochs", "2")) == 0
    return out, data_dir


@pytest.mark.slow
def test_evaluate_on_the_validation_file_gives_the_score_training_recorded(tiny_run, capsys):
    out, data_dir = tiny_run
    recorded = json.loads((out / "results.json").read_text())["metrics"]["validation"]
    assert main(["evaluate", str(out), "--file", str(data_dir / "validation.csv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 8 and result["main_metric"] == "accuracy"
    # the same weights on the same rows in this process: the same predictions, so the same counts
    assert result["scores"]["accuracy"] == recorded["accuracy"] and result["scores"]["f1"] == recorded["f1"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_predict_writes_every_row_with_probabilities(tiny_run, tmp_path, suffix):
    out, data_dir = tiny_run
    with open(data_dir / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    source = tmp_path / f"new{suffix}"
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps({"text": r["text"], "id": i}) + "\n" for i, r in enumerate(rows)))
    else:
        sep = "," if suffix == ".csv" else "\t"
        source.write_text("text\n" + "".join(f"{r['text']}\n" for r in rows) if sep == "\t" else
                          "text\n" + "".join(f'"{r["text"]}"\n' for r in rows))
    assert main(["predict", str(out), "--file", str(source)]) == 0
    written = source.with_name(f"new.predictions{suffix}")
    if suffix == ".jsonl":
        got = [json.loads(line) for line in written.read_text().splitlines()]
        assert [g["id"] for g in got] == list(range(len(rows)))
        probabilities = [g["probabilities"] for g in got]
    else:
        got = pd.read_csv(written, sep="," if suffix == ".csv" else "\t")
        assert list(got.columns) == ["text", "prediction", "prob_0", "prob_1"]
        probabilities = got[["prob_0", "prob_1"]].to_dict(orient="records")
        got = got.to_dict(orient="records")
    assert len(got) == len(rows) and [g["text"] for g in got] == [r["text"] for r in rows]
    for row, probs in zip(got, probabilities):
        assert abs(sum(probs.values()) - 1) < 1e-5  # two probabilities rounded to 1e-6 each
        assert int(row["prediction"]) == int(max(probs, key=probs.get).removeprefix("prob_"))
    # a second predict refuses to overwrite, in one line
    assert main(["predict", str(out), "--file", str(source)]) == 2


@pytest.mark.slow
def test_files_whose_columns_do_not_match_are_refused_in_one_line(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\nthe film,1\n")
    assert main(["predict", str(out), "--file", str(bad)]) == 2
    assert main(["evaluate", str(out), "--file", str(bad)]) == 2
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text\nthe film\n")
    assert main(["evaluate", str(out), "--file", str(unlabelled)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: file '{bad}' has no column(s) text (it has: review, label): this run reads text",
        f"error: file '{bad}' has no column(s) text (it has: review, label): this run reads text, label",
        f"error: file '{unlabelled}' has no column(s) label (it has: text): this run reads text, label",
    ]
    assert not (tmp_path / "bad.predictions.csv").exists()
    assert main(["predict", str(tmp_path), "--file", str(bad)]) == 2  # not a run folder


def test_extractive_qa_predicts_and_scores_a_file_through_the_same_interface(tmp_path):
    """An untrained tiny QA head: the answers are whatever it picks, but each is a span of its context and
    evaluate scores exactly those answers."""
    from types import SimpleNamespace

    import transformers
    from tiny_run import make_tiny_setup
    from transformers import Trainer, TrainingArguments

    from progtuning.tasks.metrics import squad_metrics

    model_dir, _ = make_tiny_setup(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir)
    task = task_from_spec(task_spec(squad_task("squad"), "squad"))
    table = pd.DataFrame({
        "question": ["what was good ?", "the plot ?"],
        "context": ["the movie was good and fun", "the plot was boring"],
        "answers": [json.dumps({"text": ["good"], "answer_start": [14]}), {"text": ["boring"], "answer_start": [13]}],
    })
    examples = task.examples_from_table(table, "answers", "file 'q.jsonl'")
    features = task.features_for(examples, tokenizer, SimpleNamespace(max_length=16, doc_stride=4))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True,
                                                          disable_tqdm=True), data_collator=task.collator(tokenizer))
    answers = [row["answer"] for row in task.predictions(trainer, features, "test")]
    assert len(answers) == 2 and all(a in c for a, c in zip(answers, table["context"]))
    expected = squad_metrics({"0": answers[0], "1": answers[1]}, examples)
    assert task.evaluate(trainer, features, "test") == expected
    with pytest.raises(ProgtuningError, match=r"row 1: answers must look like"):
        task.examples_from_table(table.assign(answers=["good"] * 2), "answers", "file 'q.jsonl'")
