"""Bottleneck adapters: placement per architecture, identity at init, names, counts, errors.

Run: HF_HUB_OFFLINE=1 python -m pytest -q tests/test_adapters.py
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from progtuning.methods.adapter import (
    PROJECTIONS,
    BottleneckAdapter,
    add_adapters,
    adapter_parameter_names,
)
from progtuning.core.blocks import find_blocks
from progtuning.errors import ProgtuningError

warnings.filterwarnings("ignore", message=".*token_id must be.*")

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def tiny_config(arch: str):
    if arch == "bert":
        return T.BertConfig(**_COMMON)
    if arch == "roberta":
        return T.RobertaConfig(**_COMMON)
    if arch == "xlm-roberta":
        return T.XLMRobertaConfig(**_COMMON)
    if arch == "electra":
        return T.ElectraConfig(embedding_size=16, **_COMMON)
    if arch == "deberta-v2":
        return T.DebertaV2Config(**_COMMON)
    if arch == "mpnet":
        return T.MPNetConfig(**_COMMON)
    if arch == "distilbert":
        return T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, pad_token_id=0)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, pad_token_id=0, **_COMMON)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, pad_token_id=0, **_COMMON)
    if arch == "t5":
        return T.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, pad_token_id=0, decoder_start_token_id=0
        )
    raise KeyError(arch)


ARCHS = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "mpnet", "distilbert", "gpt2", "llama", "qwen2", "t5"]

# The projections an adapter must follow, written out per architecture (not read from PROJECTIONS):
# (attention output, feed-forward output) for encoder blocks; T5 decoder blocks differ (see below).
EXPECTED = {
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "xlm-roberta": ("attention.output.dense", "output.dense"),
    "electra": ("attention.output.dense", "output.dense"),
    "deberta-v2": ("attention.output.dense", "output.dense"),
    "mpnet": ("attention.attn.o", "output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "t5": ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo"),
}


def batch(arch: str) -> dict:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    if arch == "t5":
        ids[:, -1] = 1  # T5 classification pools on the <eos> token
    return {"input_ids": ids}


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForSequenceClassification.from_config(tiny_config(arch)).eval()


def expected_adapter_modules(arch: str, block_paths, adapter_type: str) -> list[str]:
    attn, ffn = EXPECTED[arch]
    out = []
    for path in block_paths:
        block_ffn = ffn
        if arch == "t5" and ".decoder." in f".{path}.":
            block_ffn = "layer.2.DenseReluDense.wo"  # decoder: self-attn, cross-attn, feed-forward
        out += ([f"{path}.{attn}.adapter"] if adapter_type == "houlsby" else []) + [f"{path}.{block_ffn}.adapter"]
    return out


# -- the adapter module ------------------------------------------------------------------------
def test_bottleneck_adapter_is_identity_at_init_and_sized_by_reduction_factor():
    adapter = BottleneckAdapter(768, reduction_factor=16)
    assert adapter.bottleneck == 48
    assert adapter.down.weight.shape == (48, 768) and adapter.up.weight.shape == (768, 48)
    # 768·48 + 48 (down) + 48·768 + 768 (up)
    assert sum(p.numel() for p in adapter.parameters()) == 74_544
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.weight) > 0
    assert 0.005 < adapter.down.weight.std().item() < 0.015  # N(0, 0.01²)
    h = torch.randn(3, 5, 768)
    assert torch.equal(adapter(h), h)  # h + 0 exactly: the up-projection's weight and bias are zero


def test_bottleneck_adapter_residual_formula_and_activations():
    torch.manual_seed(0)
    h = torch.randn(4, 16)
    for activation, act in (("relu", torch.relu), ("gelu", nn.functional.gelu)):
        adapter = BottleneckAdapter(16, reduction_factor=4, activation=activation)
        nn.init.normal_(adapter.up.weight)
        nn.init.normal_(adapter.up.bias)
        expected = h + nn.functional.linear(
            act(nn.functional.linear(h, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias
        )
        assert torch.equal(adapter(h), expected)  # the same ops on the same tensors: bit-identical
    assert isinstance(BottleneckAdapter(8).act, nn.GELU)  # the default: no dead units at init
    assert BottleneckAdapter(8, reduction_factor=64).bottleneck == 1  # never a zero-width bottleneck
    with pytest.raises(ProgtuningError, match="activation"):
        BottleneckAdapter(8, activation="tanh")
    with pytest.raises(ProgtuningError, match="reduction_factor"):
        BottleneckAdapter(8, reduction_factor=0)


# -- placement on every supported architecture -------------------------------------------------
@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_sit_on_the_expected_projections_of_every_block(arch, adapter_type):
    model = tiny_model(arch)
    base_names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        before = model(**batch(arch)).logits
    layout = find_blocks(model)

    added = add_adapters(model, adapter_type, reduction_factor=4)

    assert added == expected_adapter_modules(arch, layout.block_paths, adapter_type)
    # The base parameter names did not change (base checkpoints still load) ...
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if ".adapter." not in n] == base_names
    # ... and the new parameters are exactly the adapters' down/up weights and biases.
    adapter_names = {f"{m}.{p}" for m in added for p in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert set(names) - set(base_names) == adapter_names == set(adapter_parameter_names(model))
    # find_blocks puts each adapter parameter in the block its name is under.
    groups = find_blocks(model).groups
    for name in adapter_names:
        block = next(i for i, path in enumerate(layout.block_paths) if name.startswith(path + "."))
        assert groups[name] == block
    # Each adapter's width is the projection's output width, hidden // 4 in the bottleneck.
    for module_name in added:  # every tiny config has hidden size 32
        adapter = model.get_submodule(module_name)
        assert (adapter.hidden_size, adapter.bottleneck, adapter.down.in_features) == (32, 8, 32)

    # Exactly the base model at init (up-projection zero) ...
    with torch.no_grad():
        assert torch.equal(model(**batch(arch)).logits, before)  # each adapter adds an exact 0
        # ... and the adapters really run: a non-zero up-projection changes the output.
        for module_name in added:
            nn.init.normal_(model.get_submodule(module_name).up.weight, std=0.5)
        assert not torch.allclose(model(**batch(arch)).logits, before)


def test_gpt2_conv1d_projection_width_comes_from_the_weight():
    model = tiny_model("gpt2")
    assert model.transformer.h[0].mlp.c_proj.weight.shape == (128, 32)  # Conv1D: (in, out), in = 4·32
    add_adapters(model, "houlsby", reduction_factor=8)
    adapter = model.transformer.h[0].mlp.c_proj.adapter
    assert adapter.down.in_features == 32 and adapter.bottleneck == 4


def test_question_answering_models_take_adapters_too():
    torch.manual_seed(0)
    model = T.AutoModelForQuestionAnswering.from_config(tiny_config("llama"))  # blocks at transformer.layers
    added = add_adapters(model, "pfeiffer", reduction_factor=4)
    assert added == ["transformer.layers.0.mlp.down_proj.adapter", "transformer.layers.1.mlp.down_proj.adapter"]


def test_adapters_survive_deepcopy_and_base_checkpoints_still_load():
    model = tiny_model("bert")
    base_state = copy.deepcopy(model.state_dict())
    add_adapters(model, "houlsby", reduction_factor=4)
    for name in adapter_parameter_names(model):
        if name.endswith("up.weight"):
            nn.init.normal_(model.get_parameter(name), std=0.5)
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(adapter_parameter_names(model))
    clone = copy.deepcopy(model)  # the hook is a module-level function, so copies work
    with torch.no_grad():
        # a deep copy runs the same ops on copies of the same bits, in this process
        assert torch.equal(clone(**batch("bert")).logits, model(**batch("bert")).logits)


def test_houlsby_count_on_bert_base():
    with torch.device("meta"):
        model = T.AutoModelForSequenceClassification.from_config(T.BertConfig())
    added = add_adapters(model, "houlsby", reduction_factor=16)
    assert len(added) == 24
    # per adapter 768·48 + 48 + 48·768 + 768 = 74,544; two per block, 12 blocks
    sizes = dict(model.named_parameters())
    assert sum(sizes[n].numel() for n in adapter_parameter_names(model)) == 74_544 * 2 * 12 == 1_789_056


def test_projection_table_covers_the_block_locator_architectures():
    assert set(PROJECTIONS) == set(EXPECTED)


# -- errors ----------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))


def test_unknown_architecture_is_a_one_line_error_listing_what_is_supported():
    with pytest.raises(ProgtuningError) as err:
        add_adapters(_Unknown())
    message = str(err.value)
    assert "\n" not in message and "bert" in message and "t5" in message and "LoRA" in message


def test_unknown_model_type_with_a_known_layout_is_accepted():
    config = T.BertConfig(**_COMMON)
    model = T.BertForSequenceClassification(config)
    model.config.model_type = "my-bert"  # e.g. a BERT variant registered under another name
    added = add_adapters(model, "pfeiffer", reduction_factor=4)
    assert added == [f"bert.encoder.layer.{i}.output.dense.adapter" for i in range(2)]


def test_bad_type_and_double_application_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ProgtuningError, match="houlsby, pfeiffer"):
        add_adapters(model, "lora")
    add_adapters(model, "pfeiffer")
    with pytest.raises(ProgtuningError, match="already has adapters"):
        add_adapters(model, "pfeiffer")
