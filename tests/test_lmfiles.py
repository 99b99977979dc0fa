"""The user's language-model files (tasks causal-lm and instruct), and the built-in LM tasks."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from progtuning.errors import ProgtuningError
from progtuning.tasks.builtin import load_builtin
from progtuning.tasks.builtin_lm import BUILTIN_LM_TASKS, MAX_CHARS, MAX_WORDS, load_builtin_lm, read_dialogue
from progtuning.tasks.lmfiles import load_lm_files


def _jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# -- plain text --------------------------------------------------------------------------------
def test_text_lines_and_a_seeded_validation_split(tmp_path):
    train = tmp_path / "corpus.txt"
    train.write_text("".join(f"line {i}\n" for i in range(20)) + "\n   \n")
    task, data = load_lm_files("causal-lm", train)
    assert (task.format, task.packing, task.name, task.main_metric) == ("text", True, "corpus", "perplexity")
    assert (len(data["train"]), len(data["validation"])) == (18, 2)  # blank lines skipped, 10% held out
    assert sorted([*data["train"]["text"], *data["validation"]["text"]]) == sorted(f"line {i}" for i in range(20))
    _, again = load_lm_files("causal-lm", train)
    assert list(again["validation"]["text"]) == list(data["validation"]["text"])
    task, _ = load_lm_files("causal-lm", train, packing=False)
    assert task.packing is False


def test_text_from_jsonl_field(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"body": "a b"}, {"body": "c d"}])
    validation = _jsonl(tmp_path / "v.jsonl", [{"body": "e"}])
    _, data = load_lm_files("causal-lm", train, validation, text_column="body")
    assert list(data["train"]["text"]) == ["a b", "c d"] and list(data["validation"]["text"]) == ["e"]


# -- instructions ---------------------------------------------------------------------------------
def test_prompt_response_system_and_messages(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    train = _jsonl(tmp_path / "train.jsonl", [
        {"prompt": "2+2?", "response": "4"},
        {"prompt": "name?", "response": "Bob", "system": "be brief"},
        {"messages": chat, "id": 7},
    ])
    validation = _jsonl(tmp_path / "validation.jsonl", [{"prompt": "3+3?", "response": "6"}])
    test = _jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1?", "response": "2"}])
    task, data = load_lm_files("instruct", train, validation, test)
    assert (task.format, task.main_metric, task.eval_splits) == ("instruction", "exact_match", ("validation",))
    assert data["train"]["messages"][0] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert data["train"]["messages"][1][0] == {"role": "system", "content": "be brief"}
    assert data["train"]["messages"][2] == chat
    assert list(data) == ["train", "validation", "test"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "x"}], "line 1 has neither 'prompt' and 'response' nor 'messages' (fields: prompt): add them"),
        ([{"prompt": "x", "response": "y"}, {"prompt": "x", "response": "  "}], "line 2 has an empty 'response'"),
        ([{"prompt": "", "response": "y"}], "line 1 has an empty 'prompt'"),
        ([{"prompt": "x", "response": 4}], "line 1 has a non-text 'response'"),
        (['{"prompt": "x",'], "line 1 is not valid JSON"),
        (["[1, 2]"], "line 1 is not a JSON object"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "line 1: the last turn is the user's, not an assistant response"),
        ([{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}], "role 'bot'"),
    ],
)
def test_bad_instruction_lines_are_one_line_errors(tmp_path, rows, message):
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ProgtuningError) as error:
        load_lm_files("instruct", path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "task, name, content, message",
    [
        ("causal-lm", "data.csv", "text\na\n", "name it .txt, .jsonl or .json"),
        ("instruct", "data.txt", "a\n", "instruction data must be JSONL"),
        ("causal-lm", "data.txt", "\n\n", "has no examples"),
        ("causal-lm", "data.jsonl", '{"txt": "a"}\n', "line 1 has no 'text' field"),
        ("causal-lm", "data.jsonl", '{"text": ""}\n', "line 1 has an empty 'text'"),
        ("causal-lm", "one.txt", "only\n", "too few examples to split off validation"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, task, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProgtuningError, match=message):
        load_lm_files(task, path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ProgtuningError, match="does not exist"):
        load_lm_files("causal-lm", tmp_path / "nope.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProgtuningError, match="is not UTF-8"):
        load_lm_files("causal-lm", latin)
    with pytest.raises(ProgtuningError, match="packing applies to plain text"):
        load_lm_files("instruct", _jsonl(tmp_path / "i.jsonl", [{"prompt": "a", "response": "b"}] * 3), packing=True)


# -- built-in language-model tasks ----------------------------------------------------------------
def test_derived_instructions_are_the_classification_rows_and_splits():
    task, data = load_builtin_lm("sms-spam-instruct", max_train_examples=50, max_eval_examples=30, seed=1)
    _, source = load_builtin("sms-spam", 50, 30, seed=1)
    assert task.main_metric == "exact_match" and task.format == "instruction"
    for split in ("train", "validation", "test"):
        conversations, rows = data[split]["messages"], source[split]
        assert len(conversations) == len(rows)
        for messages, text, label in zip(conversations, rows["text"], rows["label"]):
            prompt, answer = messages[0]["content"], messages[1]["content"]
            assert prompt.startswith("Spam or ham? ")
            body = prompt.removeprefix("Spam or ham? ").removesuffix(" ...")
            assert text.split()[: len(body.split())] == body.split()  # the message, possibly cut
            assert len(body) <= MAX_CHARS and len(body.split()) <= MAX_WORDS
            assert answer == ("spam" if label == 1 else "ham")
    assert Counter(m[1]["content"] for m in data["train"]["messages"]) == Counter(
        "spam" if label else "ham" for label in source["train"]["label"]
    )


@pytest.mark.slow
def test_every_builtin_lm_task_loads_with_fixed_evaluation_examples():
    for name in BUILTIN_LM_TASKS:
        task, first = load_builtin_lm(name, max_train_examples=20, max_eval_examples=10, seed=0)
        _, other_seed = load_builtin_lm(name, max_train_examples=20, max_eval_examples=10, seed=1)
        task.check(first)
        column = task.column
        assert {s: len(d) for s, d in first.items()} == {"train": 20, "validation": 10, "test": 10}, name
        assert list(first["validation"][column]) == list(other_seed["validation"][column]), name
        assert list(first["train"][column]) != list(other_seed["train"][column]), name


def test_dialogue_splits_and_formats():
    pairs = read_dialogue()
    assert len(pairs) == 64_248 and all(s and r for s, r in pairs)
    text_task, lines = load_builtin_lm("movie-lines")
    assert {s: len(d) for s, d in lines.items()} == {"train": 51_398, "validation": 6_425, "test": 6_425}
    assert text_task.packing and text_task.main_metric == "perplexity"
    statement, reply = lines["train"][0]["text"].split("\n")
    assert (statement, reply) in set(pairs)
    task, data = load_builtin_lm("movie-dialog", max_train_examples=5, max_eval_examples=5)
    assert task.main_metric == "token_f1"
    # the same pairs in both formats: the evaluation subsets are drawn with the same seed
    assert [[m["content"] for m in c] for c in data["validation"]["messages"]] == [
        text.split("\n") for text in load_builtin_lm("movie-lines", 5, 5)[1]["validation"]["text"]
    ]
