"""Stage switches on tiny decoders: exactly the intended parameters change, every other one is bit-identical.

For tiny random Llama (tied and untied output embedding), GPT-2 (tied), Qwen2 and Mistral, under full fine-tuning,
LoRA (peft CAUSAL_LM), bottleneck adapters and BitFit: a few AdamW steps at a large learning rate
in each stage of a 3-stage schedule over 4 blocks, then the set of changed parameters is compared
with the set the stage should train, which is written here from parameter names, not asked of the
freezer. Plus the tied output embedding: it is head, trains in every stage, and is counted once.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_model
from progtuning.core.counting import plan_updates
from progtuning.core.freezing import ProgressiveFreezer
from progtuning.core.schedule import explicit, progressive
from progtuning.errors import ProgtuningError
from progtuning.methods.api import MethodConfig, apply_method

NUM_BLOCKS, STAGES = 4, 3  # parts of one block, the leftover on top: stages train 0-3, 1-3, 2-3
METHODS = ("full", "lora", "adapter", "bitfit")
# Tied Llama and GPT-2 in the fast suite; untied Llama, Qwen2 (attention biases) and Mistral as slow tests.
CASES = [
    pytest.param(arch, tie, method, id=f"{arch}-{'tied' if tie else 'untied'}-{method}",
                 marks=() if (arch, tie) in (("llama", True), ("gpt2", True)) else pytest.mark.slow)
    for arch, tie in (("llama", True), ("gpt2", True), ("llama", False), ("qwen2", False), ("mistral", False))
    for method in METHODS
    if not (method == "bitfit" and arch in ("llama", "mistral"))  # no biases: refused, tested below
]
_BLOCK = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_HEAD = re.compile(r"(^|\.)(lm_head|norm|ln_f)\.")  # output layer and final norm (not the blocks' norms)
_BLOCK_NORM = re.compile(r"\.(input_layernorm|post_attention_layernorm|ln_1|ln_2)\.")


def _decoder(arch: str, tie: bool):
    if arch == "mistral":  # a Llama-style decoder with its own model type (sliding-window attention)
        import transformers

        from conftest import tiny_config

        config = transformers.MistralConfig(**tiny_config("llama", num_layers=NUM_BLOCKS).to_diff_dict())
        config.tie_word_embeddings = tie
        torch.manual_seed(0)
        return transformers.MistralForCausalLM(config)
    return tiny_model(arch, num_layers=NUM_BLOCKS, task="causal-lm", tie_word_embeddings=tie)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (4, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _block(name: str) -> int | None:
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else None


def _expected(name: str, method: str, blocks: set[int]) -> bool:
    """Whether parameter ``name`` trains in a stage over ``blocks`` (embeddings trained), by its name."""
    block = _block(name)
    in_stage = block in blocks
    if method == "full":
        return in_stage or block is None  # blocks of the stage, embeddings, final norm, output layer
    if method == "lora":
        return in_stage and "lora_" in name
    if method == "adapter":
        return in_stage and (".adapter." in name or bool(_BLOCK_NORM.search(name)))
    if method == "bitfit":  # every bias; the final norm's bias trains in every stage
        return name.endswith(".bias") and (in_stage or bool(_HEAD.search(name)))
    raise AssertionError(method)


def _changed_per_stage(model, method: str, steps: int = 2) -> list[tuple[set[str], set[str]]]:
    freezer = ProgressiveFreezer(model, progressive(NUM_BLOCKS, STAGES, "always"))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.05, weight_decay=0.0)
    model.train()
    results = []
    for stage in range(STAGES):
        freezer.apply(stage, optimizer)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for step in range(steps):  # two steps: LoRA's A gets its first gradient once B has moved
            loss = model(**_batch(step)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        blocks = set(freezer.schedule.stages[stage].blocks)
        expected = {n for n, _ in model.named_parameters() if _expected(n, method, blocks)}
        results.append((changed, expected))
    return results


@pytest.mark.parametrize("arch, tie, method", CASES)
def test_exactly_the_stage_trains(arch, tie, method):
    model = apply_method(_decoder(arch, tie), MethodConfig(name=method), task_type="causal_lm")
    for stage, (changed, expected) in enumerate(_changed_per_stage(model, method)):
        assert expected, f"stage {stage} expects nothing to train"
        assert changed == expected, (
            f"stage {stage}: unexpected {sorted(changed - expected)[:4]}, unchanged {sorted(expected - changed)[:4]}"
        )


def test_peft_methods_leave_the_pretrained_lm_head_frozen():
    for method in ("lora", "adapter"):
        model = apply_method(_decoder("llama", False), MethodConfig(name=method), task_type="causal_lm")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and not any(_HEAD.search(n) or "embed_tokens" in n for n in trainable), method
        if method == "lora":
            assert type(model).__name__ == "PeftModelForCausalLM"  # peft's CAUSAL_LM wrapper (it generates)


def test_bitfit_without_biases_is_refused():
    with pytest.raises(ProgtuningError, match="bitfit finds nothing to train in LlamaForCausalLM"):
        apply_method(_decoder("llama", True), MethodConfig(name="bitfit"), task_type="causal_lm")


# -- the tied output embedding ----------------------------------------------------------------------
# core/blocks.py counts a tied output embedding as head (tied_head="head", the default).
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_output_embedding_trains_in_every_stage_and_counts_once(arch):
    model = _decoder(arch, True)
    table = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is table
    # embeddings "never": only the head keeps the shared table training
    freezer = ProgressiveFreezer(model, progressive(NUM_BLOCKS, STAGES, "never"))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.05, weight_decay=0.0)
    for stage in range(STAGES):
        freezer.apply(stage, optimizer)
        before = table.detach().clone()
        model(**_batch(stage)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert not torch.equal(table, before), f"the tied head did not train in stage {stage}"

    unique = {id(p): p for p in model.parameters()}  # parameters() yields a shared tensor once
    accounting = plan_updates(freezer)
    assert accounting.total_params == sum(p.numel() for p in unique.values())
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    final_norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    head = table.numel() + sum(p.numel() for p in final_norm.parameters())
    for stage in accounting.stages:
        in_blocks = sum(p.numel() for i in stage.blocks for p in blocks[i].parameters())
        # the shared table once, the final norm, the stage's blocks; GPT-2's position table is frozen
        assert stage.trainable_params == head + in_blocks, f"stage {stage.index}"
    assert accounting.head_params == head
    assert accounting.method_trainable_params == accounting.total_params
