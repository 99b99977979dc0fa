"""`progtuning train` on language-model tasks end to end, on tiny decoders: results, save → reload → generate, errors.

The runs use tiny random Llama and GPT-2 models with a word-level tokenizer (tests/tiny_lm.py) and a
learnable instruction set ("is fun good or bad ?" → "good"). A reloaded model must score exactly what
the run reported, so the saved files are the trained model; every bad input is one line, exit code
2, and no output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from progtuning.runs.cli import main
from progtuning.tasks.lm import CACHE_REFUSAL, PLAIN_CHAT_TEMPLATE, CausalLMCollator, greedy_generate, token_nll
from progtuning.tasks.lmfiles import load_lm_files
from progtuning.tasks.metrics import generation_scores
from tiny_lm import make_tiny_lm, write_instructions, write_text

FAST = ["--batch-size", "8", "--eval-batch-size", "8", "--max-length", "32", "--threads", "1",
        "--logging-steps", "1", "--no-save-checkpoints", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    files = SimpleNamespace(
        root=root,
        llama=make_tiny_lm(root, "llama", tie=True, chat=True),
        gpt2=make_tiny_lm(root, "gpt2", tie=True, chat=False),
        train=write_instructions(root / "train.jsonl", 32, seed=0),
        validation=write_instructions(root / "validation.jsonl", 8, seed=1),
        test=write_instructions(root / "test.jsonl", 8, seed=2),
        text=write_text(root / "corpus.txt", 60),
    )
    return files


def _instruct(setup, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "instruct", "--train-file", str(setup.train), "--validation-file", str(setup.validation),
            "--test-file", str(setup.test), "--model", str(model), "--output-dir", str(out), *FAST, *extra]


def _rescore(model, tokenizer, setup, results: dict) -> dict:
    """Validation loss and generation scores of ``model``, computed the way the run computed them."""
    task, data = load_lm_files("instruct", setup.train, setup.validation, setup.test, max_new_tokens=4)
    features = task.preprocess(data, tokenizer, SimpleNamespace(max_length=32))
    scores = token_nll(model, features.eval["validation"], CausalLMCollator(features.extra["pad_token_id"]), 8)
    generation = features.extra["generation"]["validation"]
    texts = greedy_generate(model, tokenizer, generation["prompts"], 4, 8)
    return {**scores, **generation_scores(texts, generation["references"])}


@pytest.mark.slow
def test_full_fine_tuning_reports_stages_and_the_saved_model_reloads_and_generates(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    assert main(_instruct(setup, setup.llama, out, "--epochs", "3", "--learning-rate", "5e-3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["kind"] == "causal_lm" and results["task"]["format"] == "instruction"
    assert results["main_metric"] == "exact_match" and results["task"]["greater_is_better"] is True
    assert [s["blocks"] for s in results["stages"]] == [[0, 1, 2, 3], [1, 2, 3], [2, 3]]
    assert [(s["start_step"], s["end_step"]) for s in results["stages"]] == [(0, 4), (4, 8), (8, 12)]
    assert results["reduction"] > 0 and results["reduction_blocks_only"] == pytest.approx(0.25)
    assert set(results["metrics"]) == {"validation", "test"}
    validation = results["metrics"]["validation"]
    assert {"loss", "perplexity", "tokens", "exact_match", "token_f1"} <= set(validation)
    assert validation["tokens"] == 16  # 8 one-word responses, each with its end-of-turn token
    assert any("eval_loss" in entry for entry in results["log_history"])  # validation loss every epoch

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    rescored = _rescore(model, tokenizer, setup, results)
    # the same weights, data, batches and kernels as at the end of the run, in another process state
    assert rescored["loss"] == pytest.approx(validation["loss"], rel=1e-5)
    assert rescored["exact_match"] == validation["exact_match"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "is fun good or bad ?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.slow
def test_lora_saves_an_adapter_that_auto_peft_reloads_with_the_plain_template(setup, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path / "lora"
    assert main(_instruct(setup, setup.gpt2, out, "--epochs", "2", "--method", "lora", "--learning-rate", "1e-2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "model" / "model.safetensors").exists()
    # LoRA trains no head on a causal LM: every trainable parameter sits in a block
    assert results["accounting"]["head_params"] == 0 and results["reduction_blocks_only"] == pytest.approx(
        results["reduction"])
    model = AutoPeftModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE  # saved with the model: prompted as it was trained
    rescored = _rescore(model, tokenizer, setup, results)
    assert rescored["loss"] == pytest.approx(results["metrics"]["validation"]["loss"], rel=1e-5)
    assert rescored["exact_match"] == results["metrics"]["validation"]["exact_match"]


def test_plain_text_packed_end_to_end(setup, tmp_path):
    out = tmp_path / "text"
    code = main(["train", "--task", "causal-lm", "--train-file", str(setup.text), "--model", str(setup.llama),
                 "--output-dir", str(out), "--epochs", "2", "--no-save-model", *FAST])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["format"] == "text" and results["task"]["packing"] is True
    assert results["main_metric"] == "perplexity" and results["task"]["greater_is_better"] is False
    validation = results["metrics"]["validation"]
    assert validation["perplexity"] == pytest.approx(2.718281828 ** validation["loss"], rel=1e-9)
    assert "exact_match" not in validation
    assert len(results["stages"]) == 2


# -- bad input: one line, exit code 2, nothing written ------------------------------------------------
def _fails(capsys, tmp_path, *argv) -> str:
    out = tmp_path / "out"
    code = main(["train", *FAST, *argv, "--output-dir", str(out)])  # argv last: it may override FAST
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # errors found once the model is loaded come after its loading (and tokenizing) progress bars
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    assert not out.exists()
    return last


def test_missing_field(capsys, tmp_path, setup):
    bad = write_instructions(tmp_path / "bad.jsonl", 0, rows=[{"prompt": "is fun good"}, {"question": "x"}])
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(bad), "--model", str(setup.llama))
    assert "line 1 has neither 'prompt' and 'response' nor 'messages'" in err


def test_empty_response(capsys, tmp_path, setup):
    bad = write_instructions(tmp_path / "bad.jsonl", 0, rows=[{"prompt": "is fun good", "response": "good"},
                                                             {"prompt": "is dull good", "response": ""}])
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(bad), "--model", str(setup.llama))
    assert "line 2 has an empty 'response'" in err


def test_conversation_longer_than_max_length(capsys, tmp_path, setup):
    rows = [{"prompt": "is fun good or bad ?", "response": "good"}] * 9 + [{"prompt": "the movie " * 20, "response": "bad"}]
    data = write_instructions(tmp_path / "long.jsonl", 0, rows=rows)
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(data), "--validation-file",
                 str(setup.validation), "--model", str(setup.llama))
    assert "1 of 10 train conversations are longer than max_length=32 tokens (row 10:" in err


def test_max_length_beyond_the_model(capsys, tmp_path, setup):
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(setup.train), "--model", str(setup.llama),
                 "--max-length", "65")
    assert "max_length=65 is longer than this model takes (64 positions)" in err


def test_a_classification_model_is_not_a_language_model(capsys, tmp_path, setup):
    classifier = make_tiny_lm(setup.root, "llama", head="seq-cls")
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(setup.train), "--model", str(classifier))
    assert "holds a LlamaForSequenceClassification, not a decoder language model" in err


def test_the_prefix_cache_is_refused(capsys, tmp_path, setup):
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(setup.train), "--model", str(setup.llama),
                 "--cache-frozen", "--embeddings", "never")
    assert err == f"error: {CACHE_REFUSAL}"


def test_bitfit_on_a_model_without_biases(capsys, tmp_path, setup):
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(setup.train), "--model", str(setup.llama),
                 "--method", "bitfit")
    assert "bitfit finds nothing to train in LlamaForCausalLM" in err


def test_lm_task_needs_a_file(capsys, tmp_path, setup):
    err = _fails(capsys, tmp_path, "--task", "causal-lm", "--model", str(setup.llama))
    assert "task 'causal-lm' needs --train-file PATH" in err
    err = _fails(capsys, tmp_path, "--task", "instruct", "--train-file", str(setup.train), "--model", str(setup.llama),
                 "--packing")
    assert "packing applies to plain text" in err
