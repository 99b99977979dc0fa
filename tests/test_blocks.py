"""Block discovery: embeddings / ordered blocks / head for every supported architecture, peft, overrides, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, tiny_config, tiny_model
from torch import nn

from progtuning.core.blocks import EMBEDDINGS, HEAD, find_blocks
from progtuning.errors import ProgtuningError

# arch -> (block stack paths in order, head parameter names, embedding parameter names), seq-cls models
EXPECTED = {
    "bert": (
        ["bert.encoder.layer"],
        ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"],
        ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
         "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
         "bert.embeddings.LayerNorm.bias"],
    ),
    "roberta": (
        ["roberta.encoder.layer"],
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"],
        ["roberta.embeddings.word_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight",
         "roberta.embeddings.LayerNorm.weight", "roberta.embeddings.LayerNorm.bias",
         "roberta.embeddings.position_embeddings.weight"],
    ),
    "xlm-roberta": (
        ["roberta.encoder.layer"],
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"],
        ["roberta.embeddings.word_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight",
         "roberta.embeddings.LayerNorm.weight", "roberta.embeddings.LayerNorm.bias",
         "roberta.embeddings.position_embeddings.weight"],
    ),
    "distilbert": (
        ["distilbert.transformer.layer"],
        ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"],
        ["distilbert.embeddings.word_embeddings.weight", "distilbert.embeddings.position_embeddings.weight",
         "distilbert.embeddings.LayerNorm.weight", "distilbert.embeddings.LayerNorm.bias"],
    ),
    "electra": (
        ["electra.encoder.layer"],
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"],
        ["electra.embeddings.word_embeddings.weight", "electra.embeddings.position_embeddings.weight",
         "electra.embeddings.token_type_embeddings.weight", "electra.embeddings.LayerNorm.weight",
         "electra.embeddings.LayerNorm.bias", "electra.embeddings_project.weight", "electra.embeddings_project.bias"],
    ),
    "deberta-v2": (
        ["deberta.encoder.layer"],
        ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"],
        # the relative-position table and its norm are shared by every block: embeddings
        ["deberta.embeddings.word_embeddings.weight", "deberta.embeddings.LayerNorm.weight",
         "deberta.embeddings.LayerNorm.bias", "deberta.encoder.rel_embeddings.weight",
         "deberta.encoder.LayerNorm.weight", "deberta.encoder.LayerNorm.bias"],
    ),
    "mpnet": (
        ["mpnet.encoder.layer"],
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"],
        ["mpnet.embeddings.word_embeddings.weight", "mpnet.embeddings.position_embeddings.weight",
         "mpnet.embeddings.LayerNorm.weight", "mpnet.embeddings.LayerNorm.bias",
         "mpnet.encoder.relative_attention_bias.weight"],
    ),
    "gpt2": (
        ["transformer.h"],
        ["transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"],
        ["transformer.wte.weight", "transformer.wpe.weight"],
    ),
    "llama": (["model.layers"], ["model.norm.weight", "score.weight"], ["model.embed_tokens.weight"]),
    "qwen2": (["model.layers"], ["model.norm.weight", "score.weight"], ["model.embed_tokens.weight"]),
    "t5": (
        ["transformer.encoder.block", "transformer.decoder.block"],
        # the encoder's final norm sits between the two stacks; it is counted as head (always trained)
        ["transformer.encoder.final_layer_norm.weight", "transformer.decoder.final_layer_norm.weight",
         "classification_head.dense.weight", "classification_head.dense.bias",
         "classification_head.out_proj.weight", "classification_head.out_proj.bias"],
        ["transformer.shared.weight"],
    ),
}


def assert_partition(model: nn.Module, layout) -> None:
    """Every parameter sits in exactly one group, and block parameters live under their block's path."""
    names = [name for name, _ in model.named_parameters()]
    assert list(layout.groups) == names
    valid = {EMBEDDINGS, HEAD, *range(layout.num_blocks)}
    assert set(layout.groups.values()) <= valid
    for index, path in enumerate(layout.block_paths):
        in_block = layout.names(index)
        assert in_block, f"block {index} has no parameter"
        assert all(name.startswith(path + ".") for name in in_block)
        assert sorted(in_block) == sorted(n for n in names if n.startswith(path + "."))
    counted = sum(layout.summary(model).values())
    assert counted == sum(p.numel() for p in model.parameters())


def expected_paths(stacks: list[str], num_layers: int) -> tuple[str, ...]:
    return tuple(f"{stack}.{i}" for stack in stacks for i in range(num_layers))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_seq_cls_layout(arch):
    assert set(EXPECTED) == set(TINY_ARCHS)
    model = tiny_model(arch, num_layers=3)
    layout = find_blocks(model)
    stacks, head, embeddings = EXPECTED[arch]
    assert layout.block_paths == expected_paths(stacks, 3)
    assert layout.num_blocks == 3 * len(stacks)
    assert layout.names(HEAD) == head
    assert layout.names(EMBEDDINGS) == embeddings
    assert_partition(model, layout)


def test_t5_encoder_blocks_come_before_decoder_blocks():
    layout = find_blocks(tiny_model("t5", num_layers=2))
    assert layout.block_paths == (
        "transformer.encoder.block.0",
        "transformer.encoder.block.1",
        "transformer.decoder.block.0",
        "transformer.decoder.block.1",
    )
    # the decoder's relative attention bias lives in its first block
    assert layout.block_of("transformer.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") == 2


def test_t5_relative_attention_bias_serves_every_block_of_its_stack():
    model = tiny_model("t5", num_layers=3, task="seq2seq")
    layout = find_blocks(model)
    bias = "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    # block 0 of each stack computes the position bias once and hands it to the later blocks
    assert model.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert not model.encoder.block[1].layer[0].SelfAttention.has_relative_attention_bias
    assert layout.shared == {bias.format("encoder"): (0, 1, 2), bias.format("decoder"): (3, 4, 5)}
    assert layout.block_of(bias.format("decoder")) == 3  # it still lives in (and is counted with) block 3
    assert layout.blocks_using(bias.format("decoder")) == (3, 4, 5)
    assert layout.blocks_using("encoder.block.1.layer.1.DenseReluDense.wi.weight") == (1,)
    assert layout.blocks_using("shared.weight") == ()


def test_a_relative_bias_in_every_block_is_not_shared():
    # UMT5 gives every block its own relative attention bias: nothing is shared across blocks
    model = nn.Module()
    model.layers = nn.ModuleList(
        nn.ModuleDict({"relative_attention_bias": nn.Embedding(4, 2), "ffn": nn.Linear(2, 2)}) for _ in range(3)
    )
    layout = find_blocks(model)
    assert layout.shared == {}
    assert layout.blocks_using("layers.2.relative_attention_bias.weight") == (2,)


def test_t5_conditional_generation_layout():
    model = tiny_model("t5", num_layers=2, task="seq2seq")
    layout = find_blocks(model)
    assert layout.block_paths == ("encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1")
    # lm_head is tied to `shared`: it appears once, as head (the head trains in every stage)
    assert model.lm_head.weight is model.shared.weight
    assert layout.tied_head == ("shared.weight",)
    assert layout.names(EMBEDDINGS) == []
    assert layout.names(HEAD) == ["shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
    assert_partition(model, layout)
    # or, if asked, it follows the embeddings
    layout = find_blocks(model, tied_head="embeddings")
    assert layout.tied_head == ("shared.weight",)
    assert layout.names(EMBEDDINGS) == ["shared.weight"]
    assert_partition(model, layout)


@pytest.mark.parametrize("arch, table", [("llama", "model.embed_tokens.weight"), ("qwen2", "model.embed_tokens.weight")])
def test_tied_decoder_lm_heads_are_head(arch, table):
    model = tiny_model(arch, num_layers=2, task="causal-lm", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_parameter(table)
    layout = find_blocks(model)
    assert layout.tied_head == (table,) and layout.groups[table] == HEAD
    assert layout.names(EMBEDDINGS) == []
    assert find_blocks(model, tied_head="embeddings").groups[table] == EMBEDDINGS
    untied = find_blocks(tiny_model(arch, num_layers=2, task="causal-lm", tie_word_embeddings=False))
    assert untied.tied_head == () and untied.groups[table] == EMBEDDINGS and untied.groups["lm_head.weight"] == HEAD
    # a sequence classifier shares nothing with its head
    assert find_blocks(tiny_model(arch, num_layers=2)).tied_head == ()


def test_unknown_tied_head_choice_is_one_line():
    with pytest.raises(ProgtuningError, match="unknown tied_head 'blocks': use one of head, embeddings"):
        find_blocks(tiny_model("gpt2", num_layers=2, task="causal-lm"), tied_head="blocks")


def test_gpt2_lm_head_tied_and_untied():
    tied = tiny_model("gpt2", num_layers=2, task="causal-lm")
    layout = find_blocks(tied)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert "lm_head.weight" not in layout.groups  # tied: listed once, under its first name, as head
    assert layout.names(EMBEDDINGS) == ["transformer.wpe.weight"]
    assert layout.names(HEAD) == ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert layout.tied_head == ("transformer.wte.weight",)
    assert_partition(tied, layout)
    untied = tiny_model("gpt2", num_layers=2, task="causal-lm", tie_word_embeddings=False)
    layout = find_blocks(untied)
    assert layout.names(HEAD) == ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    assert_partition(untied, layout)


def test_bert_question_answering_layout():
    model = tiny_model("bert", num_layers=2, task="qa")
    layout = find_blocks(model)
    assert layout.block_paths == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert layout.names(HEAD) == ["qa_outputs.weight", "qa_outputs.bias"]
    assert layout.names(EMBEDDINGS) == EXPECTED["bert"][2]
    assert_partition(model, layout)


def test_summary_counts_groups():
    model = tiny_model("bert", num_layers=2)
    summary = find_blocks(model).summary(model)
    # word 100x32 + position 64x32 + token type 2x32 + LayerNorm 2x32
    assert summary["embeddings"] == 100 * 32 + 64 * 32 + 2 * 32 + 2 * 32
    # q,k,v,o 4x(32x32+32) + 2 LayerNorms 2x(2x32) + intermediate 32x64+64 + output 64x32+32
    block = 4 * (32 * 32 + 32) + 2 * 64 + (32 * 64 + 64) + (64 * 32 + 32)
    assert summary["block 0"] == summary["block 1"] == block
    assert summary["head"] == (32 * 32 + 32) + (32 * 2 + 2)
    assert set(summary) == {"embeddings", "block 0", "block 1", "head"}


# -- peft ------------------------------------------------------------------------------------------------
def _lora_bert(num_layers: int = 2):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(tiny_model("bert", num_layers=num_layers), config)


def test_peft_lora_bert_layout():
    model = _lora_bert(2)
    layout = find_blocks(model)
    prefix = "base_model.model."
    assert layout.block_paths == (prefix + "bert.encoder.layer.0", prefix + "bert.encoder.layer.1")
    assert_partition(model, layout)
    lora = [n for n in layout.groups if ".lora_" in n]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    for name in lora:
        assert layout.groups[name] == int(name.split("encoder.layer.")[1].split(".")[0])
    assert layout.names(HEAD) == [
        prefix + "bert.pooler.dense.weight",
        prefix + "bert.pooler.dense.bias",
        prefix + "classifier.original_module.weight",
        prefix + "classifier.original_module.bias",
        prefix + "classifier.modules_to_save.default.weight",
        prefix + "classifier.modules_to_save.default.bias",
    ]
    assert layout.names(EMBEDDINGS) == [prefix + n for n in EXPECTED["bert"][2]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if layout.groups[n] == HEAD} == {
        prefix + "classifier.modules_to_save.default.weight",
        prefix + "classifier.modules_to_save.default.bias",
    }


@pytest.mark.parametrize("path", ["bert.encoder.layer", "base_model.model.bert.encoder.layer"])
def test_peft_override_accepts_unwrapped_and_wrapped_path(path):
    model = _lora_bert(2)
    layout = find_blocks(model, blocks=path)
    assert layout.block_paths == ("base_model.model.bert.encoder.layer.0", "base_model.model.bert.encoder.layer.1")
    assert layout.groups == find_blocks(model).groups


# -- overrides and custom models ----------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


class _TwoStacks(nn.Module):
    """Two unrelated ModuleLists: discovery cannot tell which one holds the blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.towers = nn.ModuleList([_Block() for _ in range(3)])
        self.probes = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)])  # mixed classes: never a stack
        self.out = nn.Linear(4, 2)


def test_unknown_layout_lists_what_was_found():
    with pytest.raises(ProgtuningError) as info:
        find_blocks(_TwoStacks())
    message = str(info.value)
    assert "\n" not in message
    assert "_TwoStacks" in message
    assert "towers (3 x _Block)" in message
    assert "probes (2 x Linear)" in message
    assert "mixed" not in message
    assert "blocks='dotted.path'" in message


def test_no_module_list_at_all():
    with pytest.raises(ProgtuningError, match=r"found: none"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_dotted_path_override_on_custom_model():
    model = _TwoStacks()
    layout = find_blocks(model, blocks="towers", head=["out"])
    assert layout.block_paths == ("towers.0", "towers.1", "towers.2")
    assert layout.groups["towers.1.linear.weight"] == 1
    assert layout.groups["out.weight"] == HEAD
    assert layout.groups["embed.weight"] == EMBEDDINGS
    assert layout.groups["probes.0.weight"] == EMBEDDINGS  # not a block, not a head name
    assert_partition(model, layout)
    # without head=["out"], `out` is not a known head name
    assert find_blocks(model, blocks="towers").groups["out.weight"] == EMBEDDINGS


def test_several_paths_are_concatenated_in_order():
    model = tiny_model("t5", num_layers=2)
    layout = find_blocks(model, blocks=["transformer.decoder.block", "transformer.encoder.block"])
    assert layout.block_paths == (
        "transformer.decoder.block.0",
        "transformer.decoder.block.1",
        "transformer.encoder.block.0",
        "transformer.encoder.block.1",
    )


def test_override_with_bad_path_lists_module_lists():
    with pytest.raises(ProgtuningError) as info:
        find_blocks(tiny_model("bert", num_layers=2), blocks="bert.encoder.layers")
    message = str(info.value)
    assert "'bert.encoder.layers'" in message and "bert.encoder.layer" in message
    assert "\n" not in message


def test_override_must_name_a_module_list():
    with pytest.raises(ProgtuningError, match="no module list of blocks at 'bert.encoder'"):
        find_blocks(tiny_model("bert", num_layers=2), blocks="bert.encoder")


def test_albert_is_refused():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=2, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    with pytest.raises(ProgtuningError, match="ALBERT shares 1 block") as info:
        find_blocks(AlbertForSequenceClassification(config))
    assert "\n" not in str(info.value)


def test_tiny_config_helper_rejects_unknown_arch():
    with pytest.raises(ValueError):
        tiny_config("albert")


# -- architectures beyond the supported list, where naming rules misfire -------------------------------------
def test_modernbert_layout():
    from transformers import AutoModelForSequenceClassification, ModernBertConfig

    config = ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    layout = find_blocks(model)
    assert layout.block_paths == ("model.layers.0", "model.layers.1")
    assert layout.names(EMBEDDINGS) == ["model.embeddings.tok_embeddings.weight", "model.embeddings.norm.weight"]
    assert layout.names(HEAD) == ["model.final_norm.weight", "head.dense.weight", "head.norm.weight",
                                  "classifier.weight", "classifier.bias"]


def test_xlnet_layout():
    from transformers import AutoModelForSequenceClassification, XLNetConfig

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        XLNetConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=64, num_labels=2))
    layout = find_blocks(model)
    assert layout.names(EMBEDDINGS) == ["transformer.mask_emb", "transformer.word_embedding.weight"]
    assert layout.names(HEAD) == ["sequence_summary.summary.weight", "sequence_summary.summary.bias",
                                  "logits_proj.weight", "logits_proj.bias"]
