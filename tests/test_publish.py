"""Publishing a run: the LoRA adapter's base reference, --merge-lora, the model card, the hub push
(against a local HTTP server standing in for the hub), hub datasets by name, --version."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model

from progtuning.errors import ProgtuningError
from progtuning.methods.api import apply_method, save_method
from progtuning.methods.config import MethodConfig
from progtuning.runs.cli import main
from progtuning.runs.config import load_config, parse_overrides
from progtuning.runs.publish import HUB_IDS, model_to_save


def _lora_model():
    model = apply_method(tiny_model("bert", num_layers=2), MethodConfig(name="lora"), task_type="seq_cls")
    with torch.no_grad():  # LoRA's B starts at zero: give the update something to merge
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, generator=torch.Generator().manual_seed(0)) * 0.1)
    return model.eval()


@pytest.mark.parametrize("model, expected", [
    ("minilm-l6", HUB_IDS["minilm-l6"]), ("someone/their-bert", "someone/their-bert"), ("./my/folder", "./my/folder"),
])
def test_a_saved_lora_adapter_names_its_base_as_others_can_load_it(tmp_path, model, expected):
    saved, method = model_to_save(_lora_model(), load_config(None, {"model": model, "method": "lora"}))
    save_method(saved, method, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == expected


def test_merge_lora_saves_a_plain_model_that_predicts_as_the_adapter(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _lora_model()
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
    merged, method = model_to_save(model, load_config(None, {"method": "lora", "merge_lora": True}))
    assert method.name == "full"
    save_method(merged, method, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    # W + BA is one float32 sum instead of two matmuls: a few float32 roundings apart at these magnitudes
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_merge_lora_needs_lora():
    with pytest.raises(ProgtuningError, match="merge_lora folds LoRA into the base weights: it needs method lora"):
        load_config(None, {"method": "full", "merge_lora": True})


def _fake_run(root: Path) -> Path:
    run = root / "my-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "model.safetensors").write_bytes(b"\x00\x01weights")
    (run / "results.json").write_text('{"config": {}}')
    (run / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- progtuning\n---\n\n# my-run\n")
    return run


def test_push_sends_the_model_card_and_results_in_one_commit(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants
    from fake_hub import FakeHub

    run = _fake_run(tmp_path)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        assert main(["push", str(run), "--hub-model-id", "someone/tiny", "--hub-private"]) == 0
    assert capsys.readouterr().out.strip() == f"{hub.url}/someone/tiny/commit/abc123"
    assert hub.created == [{"name": "tiny", "organization": "someone", "visibility": "private"}]
    assert len(hub.commits) == 1
    assert hub.files == {
        "config.json": b"{}", "model.safetensors": b"\x00\x01weights",  # the model folder at the repo's root
        "README.md": (run / "README.md").read_bytes(), "results.json": (run / "results.json").read_bytes(),
    }


def test_push_is_refused_offline_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    assert main(["train", "--task", "trec6", "--push-to-hub", "--output-dir", str(out)]) == 2
    assert "--push-to-hub needs the network, but HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists()


def test_a_hub_dataset_offline_is_one_line():
    from progtuning.tasks.registry import load_task

    with pytest.raises(ProgtuningError, match=r"^cannot load dataset 'imdb': offline .*--task files --train-file$"):
        load_task(load_config(None, {"dataset": "imdb"}))


def test_a_dataset_by_name_goes_through_load_dataset(tmp_path):
    """A local dataset folder is a name datasets.load_dataset resolves offline: the same code path as the hub."""
    from progtuning.tasks.registry import load_task, task_source

    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = [("great fun", "pos"), ("dull", "neg"), ("loved it", "pos"), ("awful", "neg")] * 10
    (folder / "train.csv").write_text("review,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    (folder / "test.csv").write_text("review,sentiment\nfun,pos\nbad,neg\n")
    config = load_config(None, {"dataset": str(folder), "text_column": "review", "label_column": "sentiment"})
    task, data = load_task(config)
    assert task_source(config) == "hub" and task.label_names == ("neg", "pos")
    assert set(data) == {"train", "validation", "test"}
    assert len(data["train"]) + len(data["validation"]) == 40 and data["test"]["label"] == [1, 0]
    with pytest.raises(ProgtuningError, match=r"has no column\(s\) text"):
        load_task(load_config(None, {"dataset": str(folder)}))
    with pytest.raises(ProgtuningError, match="give the data once"):
        load_config(None, {"dataset": "imdb", "train_file": "x.csv"})


def test_version(capsys):
    from progtuning import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"progtuning {__version__}"


@pytest.mark.slow
def test_a_lora_runs_card_names_its_schedule_and_reproduces_it(tmp_path):
    from tiny_run import make_tiny_setup, train_argv

    model_dir, data_dir = make_tiny_setup(tmp_path)
    out = tmp_path / "lora-run"
    assert main(train_argv(model_dir, data_dir, out, "--method", "lora", "--lora-r", "4",
                           "--training-args.lr_scheduler_type", "cosine")) == 0
    results = json.loads((out / "results.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "- progtuning" in card
    assert f"`{model_dir}` fine-tuned on **train** (classification) with LoRA (r=4, alpha=16)" in card
    for index, stage in enumerate(results["stages"]):
        blocks = {0: "0-3", 1: "1-3", 2: "2-3"}[index]
        assert f"| {index + 1} | {stage['start_step']} | {blocks} | no | {stage['trainable_params']:,} |" in card
    assert f"{results['updated_params']:,} parameter-epochs" in card and f"{results['reduction']:.1%} fewer" in card
    assert f"| validation | {results['metrics']['validation']['accuracy']:.4f} |" in card
    # the command in the card rebuilds this run's config
    command = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    words = shlex.split(command)
    assert words[:2] == ["progtuning", "train"]
    rebuilt = load_config(None, parse_overrides(words[2:])).to_dict()
    ignored = {"output_dir", "overwrite", "resume", "push_to_hub", "hub_model_id", "hub_private", "report_to"}
    assert {k: v for k, v in rebuilt.items() if k not in ignored} == {
        k: v for k, v in results["config"].items() if k not in ignored}
    # the adapter names the base model as given, and predict loads it on that base
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir)
    assert main(["evaluate", str(out), "--file", str(data_dir / "validation.csv")]) == 0


@pytest.mark.slow
def test_merge_lora_on_the_command_line(tmp_path):
    from tiny_run import make_tiny_setup, train_argv

    model_dir, data_dir = make_tiny_setup(tmp_path)
    out = tmp_path / "merged"
    assert main(train_argv(model_dir, data_dir, out, "--method", "lora", "--merge-lora", "--epochs", "1")) == 0
    saved = {p.name for p in (out / "model").iterdir()}
    assert "model.safetensors" in saved and "adapter_config.json" not in saved
    assert json.loads((out / "model" / "progtuning_method.json").read_text())["name"] == "full"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "merged into the base weights" in card
