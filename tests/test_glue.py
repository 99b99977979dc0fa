"""GLUE: the task table, loading GLUE's own TSV files / HF exports / the Hub, and the metrics."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from progtuning.tasks import glue
from progtuning.errors import ProgtuningError
from progtuning.tasks.glue import GLUE_TASKS, glue_task, is_glue_task, load_glue

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def one_hot(ids: list[int], num_labels: int) -> np.ndarray:
    """Logits whose argmax is `ids`."""
    logits = np.zeros((len(ids), num_labels))
    logits[np.arange(len(ids)), ids] = 3.0
    return logits


# ----------------------------------------------------------------------------- the table


def test_the_nine_tasks():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


@pytest.mark.parametrize(
    "name, canonical, text_columns, num_labels, main",
    [
        ("cola", "cola", ("sentence",), 2, "matthews_correlation"),
        ("CoLA", "cola", ("sentence",), 2, "matthews_correlation"),
        ("SST-2", "sst2", ("sentence",), 2, "accuracy"),
        ("sst-2", "sst2", ("sentence",), 2, "accuracy"),
        ("MRPC", "mrpc", ("sentence1", "sentence2"), 2, "f1"),
        ("qqp", "qqp", ("question1", "question2"), 2, "f1"),
        ("STS-B", "stsb", ("sentence1", "sentence2"), 1, "pearson"),
        ("mnli", "mnli", ("premise", "hypothesis"), 3, "accuracy"),
        ("qnli", "qnli", ("question", "sentence"), 2, "accuracy"),
        ("rte", "rte", ("sentence1", "sentence2"), 2, "accuracy"),
        ("wnli", "wnli", ("sentence1", "sentence2"), 2, "accuracy"),
    ],
)
def test_glue_task(name, canonical, text_columns, num_labels, main):
    task = glue_task(name)
    assert task.name == canonical
    assert task.text_columns == text_columns
    assert task.num_labels == num_labels
    assert task.main_metric == main
    assert task.label_column == "label"
    assert task.is_regression == (canonical == "stsb")


def test_label_names_follow_hf_glue():
    assert glue_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert glue_task("qnli").label_names == ("entailment", "not_entailment")
    assert glue_task("rte").label_names == ("entailment", "not_entailment")
    assert glue_task("wnli").label_names == ("not_entailment", "entailment")
    assert glue_task("cola").label_names == ("unacceptable", "acceptable")
    assert glue_task("stsb").label_names is None


def test_mnli_scores_matched_and_mismatched():
    assert glue_task("mnli").eval_splits == ("validation", "validation_mismatched")
    assert glue_task("rte").eval_splits == ("validation",)


def test_is_glue_task():
    assert is_glue_task("STS-B") and is_glue_task("sst_2") and is_glue_task("mnli")
    assert not is_glue_task("squad") and not is_glue_task("imdb")


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ProgtuningError, match="unknown GLUE task 'squad'.*cola, sst2, mrpc"):
        glue_task("squad")
    with pytest.raises(ProgtuningError, match="unknown GLUE task"):
        load_glue("mnli-m", FIXTURES)


# ----------------------------------------------------------------------------- metrics


def test_cola_matthews_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    preds = [1, 1, 1, 0, 0, 0, 1]
    # TP=3 FN=1 TN=2 FP=1: (3*2 - 1*1) / sqrt((3+1)(3+1)(2+1)(2+1)) = 5/12
    result = glue_task("cola").metric(one_hot(preds, 2), labels)
    assert result == {"matthews_correlation": pytest.approx(5 / 12)}


def test_mrpc_and_qqp_f1_and_accuracy_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 1])
    preds = [1, 0, 1, 1, 0, 1]
    # TP=3 FP=1 FN=1: P = R = 3/4, F1 = 3/4; 4 of 6 right
    for name in ("mrpc", "qqp"):
        result = glue_task(name).metric(one_hot(preds, 2), labels)
        assert result == {"f1": pytest.approx(0.75), "accuracy": pytest.approx(4 / 6)}


def test_accuracy_tasks():
    labels = np.array([0, 1, 2, 2, 1])
    preds = [0, 1, 1, 2, 0]  # 3 of 5
    assert glue_task("mnli").metric(one_hot(preds, 3), labels) == {"accuracy": pytest.approx(0.6)}
    for name in ("sst2", "qnli", "rte", "wnli"):
        assert glue_task(name).metric(one_hot([0, 1, 1, 1], 2), np.array([0, 1, 0, 0])) == {"accuracy": 0.5}


def test_stsb_pearson_and_spearman_by_hand():
    labels = np.array([1.0, 3.0, 2.0, 4.0])
    preds = np.array([[1.0], [2.0], [3.0], [10.0]])  # (n, 1), as a regression head returns
    # Pearson: deviations x = -3,-2,-1,6 and y = -1.5,.5,-.5,1.5 -> 13 / sqrt(50 * 5) = 0.8222
    # Spearman: ranks x = 1,2,3,4, y = 1,3,2,4 -> 1 - 6*(0+1+1+0)/(4*15) = 0.8
    result = glue_task("stsb").metric(preds, labels)
    assert result["pearson"] == pytest.approx(13 / math.sqrt(250))
    assert result["spearmanr"] == pytest.approx(0.8)
    assert glue_task("stsb").metric(preds.reshape(-1), labels)["pearson"] == pytest.approx(13 / math.sqrt(250))


def test_stsb_constant_predictions_score_zero_not_nan():
    result = glue_task("stsb").metric(np.full(4, 2.5), np.array([1.0, 3.0, 2.0, 4.0]))
    assert result == {"pearson": 0.0, "spearmanr": 0.0}


# ----------------------------------------------------------------------------- GLUE's TSV files

# task -> (split sizes, validation labels, first validation text)
EXPECTED = {
    "cola": ({"train": 6, "validation": 5}, [1, 0, 1, 0, 1], "The sailors rode the breeze clear of the rocks."),
    "sst2": ({"train": 6, "validation": 5}, [1, 0, 1, 1, 0], "it 's a charming and often affecting journey . "),
    "mrpc": (
        {"train": 6, "validation": 5, "test": 5},
        [1, 0, 0, 1, 1],
        "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
    ),
    # QQP's train.tsv has one broken short row, dropped as the Hub loader does
    "qqp": ({"train": 6, "validation": 5}, [1, 1, 0, 1, 0], "What is the best way to learn Python?"),
    "stsb": ({"train": 6, "validation": 5}, [5.0, 4.75, 5.0, 2.4, 2.75], "A man with a hard hat is dancing."),
    "mnli": (
        {"train": 8, "validation": 6, "validation_mismatched": 5},
        [1, 2, 0, 2, 2, 2],  # neutral, contradiction, entailment, contradiction x3
        "The new rights are nice enough",
    ),
    "qnli": ({"train": 6, "validation": 5}, [0, 1, 1, 0, 1], "What came into force after the new constitution was herald?"),
    "rte": (
        {"train": 5, "validation": 5},
        [1, 0, 1, 0, 0],
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.",
    ),
    "wnli": ({"train": 5, "validation": 5}, [0, 1, 0, 1, 0], "The drain is clogged with hair. It has to be cleaned."),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_load_each_task_from_glue_root(name):
    sizes, labels, first_text = EXPECTED[name]
    task, data = load_glue(name, FIXTURES)
    assert task == glue_task(name)
    assert {split: len(ds) for split, ds in data.items()} == sizes
    for ds in data.values():
        assert ds.column_names == [*task.text_columns, "label", "idx"]
    validation = data["validation"]
    assert validation[task.text_columns[0]][0] == first_text
    assert validation["idx"] == list(range(sizes["validation"]))
    if task.is_regression:
        assert validation["label"] == pytest.approx(labels)
        assert validation.features["label"].dtype == "float32"
    else:
        assert validation["label"] == labels
        assert validation.features["label"].names == list(task.label_names)


def test_task_folder_works_as_data_dir_too():
    _, data = load_glue("SST-2", FIXTURES / "SST-2")
    assert len(data["train"]) == 6
    assert data["train"]["label"] == [0, 0, 1, 0, 1, 1]


def test_cola_headerless_files_and_raw_quotes():
    _, data = load_glue("cola", FIXTURES / "CoLA")
    # columns: source, label, original mark, sentence; no header row to lose
    assert data["train"]["label"] == [1, 1, 0, 1, 0, 1]
    assert data["train"]["sentence"][0] == "Our friends won't buy this analysis, let alone the next one we propose."
    # an unbalanced quote must not swallow the following lines (csv.QUOTE_NONE)
    assert data["train"]["sentence"][3] == 'She said "come in before the rain starts.'
    assert data["train"]["sentence"][4] == "The more we study verbs, the crazier they get more."
    assert "test" not in data  # test.tsv has no labels


def test_mnli_string_labels_and_mismatched_split():
    _, data = load_glue("mnli", FIXTURES)
    assert data["train"]["label"] == [1, 0, 0, 0, 1, 0, 1, 2]
    assert data["validation_mismatched"]["label"] == [2, 2, 0, 0, 1]
    assert data["validation_mismatched"]["hypothesis"][3] == "They returned a few months later."
    assert "test" not in data and "test_mismatched" not in data


def test_stsb_reads_sentences_at_columns_7_8_and_score_last():
    _, data = load_glue("stsb", FIXTURES)
    row = data["train"][5]
    assert row["sentence1"] == 'Some men are "fighting".'
    assert row["sentence2"] == "Two men are fighting."
    assert row["label"] == pytest.approx(4.25)


def test_mrpc_bom_header_and_labelled_msr_test_file():
    _, data = load_glue("mrpc", FIXTURES / "MRPC")
    assert data["train"]["label"] == [1, 0, 1, 0, 1, 1]
    assert data["test"]["label"] == [1, 1, 0, 0, 1]  # msr_paraphrase_test.txt is labelled
    assert data["train"]["sentence2"][0].startswith('Referring to him as only " the witness "')


def test_mrpc_from_msr_files_splits_dev_with_dev_ids(tmp_path):
    for name in ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt", "dev_ids.tsv"):
        shutil.copy(FIXTURES / "MRPC" / name, tmp_path / name)
    _, from_msr = load_glue("mrpc", tmp_path)
    _, from_glue = load_glue("mrpc", FIXTURES / "MRPC")
    for split in ("train", "validation", "test"):
        assert from_msr[split].to_dict() == from_glue[split].to_dict()

    (tmp_path / "dev_ids.tsv").unlink()
    with pytest.raises(ProgtuningError, match="no dev_ids.tsv"):
        load_glue("mrpc", tmp_path)


# ----------------------------------------------------------------------------- HF exports and the Hub


def test_hf_parquet_export_with_hub_split_names(tmp_path):
    _, data = load_glue("mnli", FIXTURES)
    folder = tmp_path / "mnli"  # the Hub's nyu-mll/glue layout: one lower-case folder per task
    folder.mkdir()
    data["train"].to_parquet(str(folder / "train-00000-of-00001.parquet"))
    data["validation"].to_parquet(str(folder / "validation_matched.parquet"))
    data["validation_mismatched"].to_parquet(str(folder / "validation_mismatched.parquet"))
    hidden = data["validation"].cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    hidden.to_parquet(str(folder / "test_matched.parquet"))

    _, loaded = load_glue("MNLI", tmp_path)
    assert sorted(loaded) == ["train", "validation", "validation_mismatched"]  # hidden test dropped
    assert loaded["validation"]["label"] == [1, 2, 0, 2, 2, 2]
    assert loaded["validation_mismatched"]["premise"] == data["validation_mismatched"]["premise"]


def test_hf_jsonl_export_with_string_labels(tmp_path):
    rows = [
        '{"sentence1": "A cat sat.", "sentence2": "An animal sat.", "label": "entailment"}',
        '{"sentence1": "A cat sat.", "sentence2": "A dog sat.", "label": "not_entailment"}',
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "validation.jsonl").write_text(rows[1] + "\n")
    task, data = load_glue("rte", tmp_path)
    assert data["train"]["label"] == [0, 1]
    assert data["validation"]["label"] == [1]
    assert data["train"].column_names == ["sentence1", "sentence2", "label", "idx"]


def test_hub_path_renames_mnli_splits_and_drops_hidden_test(monkeypatch):
    def split(premises, labels):
        return datasets.Dataset.from_dict(
            {"premise": premises, "hypothesis": ["h"] * len(labels), "label": labels, "idx": list(range(len(labels)))}
        )

    hub = datasets.DatasetDict(
        {
            "train": split(["a", "b"], [0, 2]),
            "validation_matched": split(["c"], [1]),
            "validation_mismatched": split(["d", "e"], [2, 0]),
            "test_matched": split(["f"], [-1]),
            "test_mismatched": split(["g"], [-1]),
        }
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append(args) or hub)
    _, data = load_glue("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert sorted(data) == ["train", "validation", "validation_mismatched"]
    assert data["validation"]["premise"] == ["c"]
    assert data["validation_mismatched"]["label"] == [2, 0]


def test_hub_unreachable_is_a_user_error(monkeypatch):
    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ProgtuningError, match="pass data_dir="):
        load_glue("cola")


# ----------------------------------------------------------------------------- user mistakes


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(ProgtuningError, match="is not a folder"):
        load_glue("rte", tmp_path / "nowhere")
    with pytest.raises(ProgtuningError, match="no GLUE rte data"):
        load_glue("rte", tmp_path)
    shutil.copy(FIXTURES / "RTE" / "train.tsv", tmp_path / "train.tsv")
    with pytest.raises(ProgtuningError, match=r"missing .*dev\.tsv"):
        load_glue("rte", tmp_path)


def test_missing_column(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood film\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nbad film\t0\n")
    with pytest.raises(ProgtuningError, match=r"lacks column\(s\) \['sentence'\]"):
        load_glue("sst2", tmp_path)


def test_unknown_label_names_the_line(tmp_path):
    shutil.copy(FIXTURES / "RTE" / "dev.tsv", tmp_path / "dev.tsv")
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(ProgtuningError, match=r"train\.tsv line 3: GLUE rte label 'maybe'"):
        load_glue("rte", tmp_path)


def test_errors_are_one_line():
    with pytest.raises(ProgtuningError) as info:
        glue._spec("nope")
    assert "\n" not in str(info.value)
