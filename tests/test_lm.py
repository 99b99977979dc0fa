"""The causal-LM task kind: response-only loss, chat templates, packing, padding, scores, model checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import datasets
import pytest
import torch

from conftest import tiny_model
from progtuning.errors import ProgtuningError
from progtuning.tasks.lm import (
    CACHE_REFUSAL,
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    CausalLMCollator,
    CausalLMTask,
    as_messages,
    conversation_problem,
    encode_conversation,
    ensure_chat_template,
    pack,
    prompt_ids,
    token_nll,
)
from progtuning.tasks.metrics import generation_scores
from tiny_lm import make_tiny_lm, tiny_tokenizer

SETTINGS = SimpleNamespace(max_length=32, doc_stride=0, cache_frozen=False)


def _instruction_task(**kwargs) -> CausalLMTask:
    return CausalLMTask(name="t", format="instruction", **kwargs)


def _conversations(*pairs) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": [as_messages(p, r) for p, r in pairs]})


# -- which tokens carry loss ----------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-template"])
def test_only_response_tokens_carry_loss(chat):
    tokenizer = tiny_tokenizer(chat)
    ensure_chat_template(tokenizer)
    messages = as_messages("is fun good or bad ?", "good")
    ids, labels = encode_conversation(tokenizer, messages)
    prompt = prompt_ids(tokenizer, messages)
    # the prompt the model is given at generation is exactly the unlabelled beginning of training
    assert ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert trained == ids[len(prompt) :]  # response, then the end-of-turn token, nothing else
    assert tokenizer.convert_ids_to_tokens(trained) == ["good", tokenizer.eos_token]


def test_every_assistant_turn_of_a_conversation_is_trained_and_no_user_turn():
    tokenizer = tiny_tokenizer(chat=True)
    messages = [
        {"role": "system", "content": "the cast"},
        {"role": "user", "content": "is fun good or bad ?"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "is dull good or bad ?"},
        {"role": "assistant", "content": "bad"},
    ]
    ids, labels = encode_conversation(tokenizer, messages)
    trained = tokenizer.convert_ids_to_tokens([label for label in labels if label != IGNORE_INDEX])
    assert trained == ["good", "<|im_end|>", "bad", "<|im_end|>"]


def test_model_loss_is_the_mean_over_response_tokens_only():
    """The model's loss with these labels equals cross-entropy over response positions, computed here."""
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_model("llama", num_layers=2, task="causal-lm").eval()
    rows = [encode_conversation(tokenizer, as_messages(p, r)) for p, r in
            [("is fun good or bad ?", "good"), ("is the movie dull or fun ?", "dull")]]
    batch = CausalLMCollator(tokenizer.pad_token_id)([{"input_ids": i, "labels": lab} for i, lab in rows])
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    response = labels.reshape(-1) != IGNORE_INDEX
    assert int(response.sum()) == 4  # "good" + end, "dull" + end
    # same kernels on the same data in one process, but the model sums in another order: float32 rounding
    assert float(out.loss) == pytest.approx(float(per_token[response].mean()), rel=1e-5)
    everything = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   batch["input_ids"][:, 1:].reshape(-1), reduction="mean")
    assert abs(float(out.loss) - float(everything)) > 1e-3  # the prompt really was left out


def test_plain_template_is_given_once_and_kept():
    tokenizer = tiny_tokenizer(chat=False)
    assert not tokenizer.chat_template
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    own = tiny_tokenizer(chat=True)
    template = own.chat_template
    ensure_chat_template(own)
    assert own.chat_template == template


def test_a_template_that_rewrites_the_beginning_is_refused():
    tokenizer = tiny_tokenizer(chat=True)
    # renders the number of turns first: a prefix of the conversation is not a prefix of its rendering
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ProgtuningError, match="cannot be located"):
        encode_conversation(tokenizer, as_messages("is fun good", "good"))


# -- checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "not a non-empty list"),
        ("hello", "not a non-empty list"),
        ([{"role": "user"}], "not an object with 'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "no text content"),
        ([{"role": "assistant", "content": "x"}], "no user turn before it"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "empty assistant response"),
        ([{"role": "user", "content": "x"}], "not an assistant response"),
    ],
)
def test_conversation_problems(messages, problem):
    assert problem in conversation_problem(messages)


def test_check_names_split_and_row():
    task = _instruction_task()
    good = _conversations(("is fun good", "good"))
    bad = datasets.Dataset.from_dict({"messages": [as_messages("a", "b"), as_messages("is it", "")]})
    with pytest.raises(ProgtuningError, match="validation row 2 of t: turn 2 is an empty assistant response"):
        task.check(datasets.DatasetDict(train=good, validation=bad))
    with pytest.raises(ProgtuningError, match="no 'validation' split"):
        task.check(datasets.DatasetDict(train=good))
    text = CausalLMTask(name="t", format="text")
    with pytest.raises(ProgtuningError, match="train row 1 of t: the text is empty"):
        text.check(datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": [" "]}),
                                        validation=datasets.Dataset.from_dict({"text": ["fine"]})))
    with pytest.raises(ProgtuningError, match=r"validation split of t lacks column\(s\) text \(has: messages\)"):
        text.check(datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["fine"]}), validation=good))


def test_settings_are_checked_when_the_task_is_built():
    with pytest.raises(ProgtuningError, match="packing applies to plain text"):
        _instruction_task(packing=True)
    with pytest.raises(ProgtuningError, match="max_new_tokens"):
        _instruction_task(max_new_tokens=0)
    with pytest.raises(ProgtuningError, match="unknown language-model format"):
        CausalLMTask(name="t", format="chat")
    assert _instruction_task().main_metric == "exact_match"
    assert _instruction_task(generate_examples=0).main_metric == "perplexity"
    assert CausalLMTask(name="t", format="text").main_metric == "perplexity"


def test_a_conversation_longer_than_max_length_is_refused_not_cut():
    tokenizer = tiny_tokenizer(chat=True)
    long_prompt = " ".join(["the movie"] * 20)
    data = datasets.DatasetDict(train=_conversations(("is fun good", "good"), (long_prompt, "bad")),
                                validation=_conversations(("is fun good", "good")))
    with pytest.raises(ProgtuningError, match=r"1 of 2 train conversations are longer than max_length=32 tokens \(row 2: 47"):
        _instruction_task().preprocess(data, tokenizer, SETTINGS)


# -- text: packing and per-line -------------------------------------------------------------------
def test_pack_joins_and_cuts_into_blocks():
    assert pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]  # a last block of 1 predicts nothing
    assert pack([[1, 2, 3], [4, 5, 6]], 4) == [[1, 2, 3, 4], [5, 6]]


@pytest.mark.parametrize("packing", [True, False])
def test_text_examples_end_with_eos_and_every_token_is_a_label(packing):
    tokenizer = tiny_tokenizer(chat=False)
    texts = ["the movie was fun .", "the plot was dull and sad .", "a film ."]
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": texts}),
                                validation=datasets.Dataset.from_dict({"text": texts[:1]}))
    task = CausalLMTask(name="t", format="text", packing=packing)
    features = task.preprocess(data, tokenizer, SimpleNamespace(max_length=8))
    rows = list(features.train["input_ids"])
    assert list(features.train["labels"]) == rows
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    if packing:
        assert [len(r) for r in rows] == [8, 8, 2] and sum(rows, []) == stream
    else:
        assert rows[0] == tokenizer(texts[0])["input_ids"] + [tokenizer.eos_token_id]
        assert len(rows[1]) == 8  # cut at max_length


# -- batching ------------------------------------------------------------------------------------
def test_collator_pads_right_and_keeps_the_eos_label_when_pad_is_eos():
    eos = 2
    collator = CausalLMCollator(pad_token_id=eos)
    batch = collator([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [7, eos], "labels": [7, eos]}])
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, eos], [7, eos, -100]]


# -- scores --------------------------------------------------------------------------------------
def test_generation_scores_normalise_like_squad():
    scores = generation_scores(["Spam.", "ham", "the good film"], ["spam", "spam", "a good movie"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ProgtuningError):
        generation_scores([], [])


def test_token_nll_is_weighted_by_tokens_not_by_batches():
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_model("llama", num_layers=2, task="causal-lm").eval()
    rows = [encode_conversation(tokenizer, as_messages(p, r)) for p, r in
            [("is fun good", "good"), ("is the story dull or fun ?", "dull and sad and poor")]]
    dataset = datasets.Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    collator = CausalLMCollator(tokenizer.pad_token_id)
    one_by_one = token_nll(model, dataset, collator, batch_size=1)
    together = token_nll(model, dataset, collator, batch_size=2)
    assert one_by_one["tokens"] == together["tokens"] == 2 + 6  # each response and its end-of-turn token
    # padding changes the summation order only: float32 rounding
    assert one_by_one["loss"] == pytest.approx(together["loss"], rel=1e-5)
    with torch.no_grad():
        losses = [float(model(**collator([{"input_ids": i, "labels": lab}])).loss) for i, lab in rows]
    expected = (2 * losses[0] + 6 * losses[1]) / 8  # not the mean of the two batch means
    assert together["loss"] == pytest.approx(expected, rel=1e-5)
    assert together["perplexity"] == pytest.approx(math.exp(together["loss"]))


# -- models ------------------------------------------------------------------------------------
def test_load_model_refuses_what_is_not_a_decoder_lm(tmp_path):
    task = _instruction_task()
    classifier = make_tiny_lm(tmp_path, "llama", head="seq-cls")
    with pytest.raises(ProgtuningError, match="holds a LlamaForSequenceClassification, not a decoder language model"):
        task.load_model(str(classifier))
    encoder = tmp_path / "bert"
    tiny_model("bert", num_layers=2).save_pretrained(encoder)
    with pytest.raises(ProgtuningError, match="holds a BertForSequenceClassification"):
        task.load_model(str(encoder))
    t5 = tmp_path / "t5"
    tiny_model("t5", num_layers=2, task="seq2seq").save_pretrained(t5)
    with pytest.raises(ProgtuningError, match="not a decoder language model"):
        task.load_model(str(t5))
    decoder = make_tiny_lm(tmp_path, "llama")
    assert type(task.load_model(str(decoder))).__name__ == "LlamaForCausalLM"


def test_check_model_refuses_long_sequences_and_the_prefix_cache():
    task = _instruction_task()
    model = tiny_model("llama", num_layers=2, task="causal-lm")  # 64 positions
    task.check_model(model, SimpleNamespace(max_length=64, cache_frozen=False))
    with pytest.raises(ProgtuningError, match="max_length=65 is longer than this model takes \\(64 positions\\)"):
        task.check_model(model, SimpleNamespace(max_length=65, cache_frozen=False))
    with pytest.raises(ProgtuningError) as error:
        task.check_model(model, SimpleNamespace(max_length=16, cache_frozen=True))
    assert str(error.value) == CACHE_REFUSAL and "\n" not in CACHE_REFUSAL
