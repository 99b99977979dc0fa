"""The freezing invariant (peft style): a few AdamW steps at a large learning rate per stage, then
exactly the stage's parameters moved and every other one is bit-identical, with no gradient and no
optimizer state. Plus: the method's frozen set is respected, eval mode of frozen blocks, optimizer
wrappers, re-application after someone flips requires_grad, and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from progtuning.core.blocks import EMBEDDINGS, HEAD, find_blocks
from progtuning.errors import ProgtuningError
from progtuning.core.freezing import ProgressiveFreezer, release_optimizer_state
from progtuning.core.schedule import explicit, progressive

STEPS_PER_STAGE = 3


def _expected_names(layout, method_trainable, stage) -> set[str]:
    """Independent of the freezer: the names a stage must train, from the layout and the stage."""
    wanted = set()
    for name in method_trainable:
        group = layout.groups[name]
        if group == HEAD or (group == EMBEDDINGS and stage.train_embeddings) or (
            isinstance(group, int) and group in stage.blocks
        ):
            wanted.add(name)
    return wanted


def check_invariant(model, schedule) -> list:
    """Run every stage of ``schedule`` for a few steps and check the invariant; returns the StageChanges."""
    params = dict(model.named_parameters())
    method_trainable = {n for n, p in params.items() if p.requires_grad}
    method_frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    freezer = ProgressiveFreezer(model, schedule)
    layout = freezer.layout
    # The optimizer is built over the whole trainable set before any stage is applied.
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.1, weight_decay=0.1)
    assert {id(p) for p in freezer.trainable_parameters()} == {id(params[n]) for n in method_trainable}
    batch = tiny_batch(n=4, seq_len=8)
    model.train()
    changes = []
    for stage in schedule.stages:
        # Gradients of the previous stage are still there (zeroed, not None): the freezer must drop them.
        changes.append(freezer.apply(stage.index, optimizer))
        wanted = _expected_names(layout, method_trainable, stage)
        assert freezer.stage_names(stage.index) == wanted
        at_switch = {n: p.detach().clone() for n, p in params.items()}
        for _ in range(STEPS_PER_STAGE):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # zeros, not None: AdamW would move zero-grad params
        assert {n for n, p in params.items() if p.requires_grad} == wanted, f"stage {stage.index}"
        for name, param in params.items():
            if name in wanted:
                assert not torch.equal(param, at_switch[name]), f"stage {stage.index}: {name} did not train"
            else:
                assert torch.equal(param, at_switch[name]), f"stage {stage.index}: frozen {name} moved"
                assert param.grad is None, f"stage {stage.index}: frozen {name} has a gradient"
                assert param not in optimizer.state, f"stage {stage.index}: frozen {name} kept optimizer state"
    for name, value in method_frozen_before.items():
        assert torch.equal(params[name], value)
        assert not params[name].requires_grad
    freezer.close()
    return changes


def test_invariant_progressive_two_stages():
    model = tiny_model("bert", num_layers=4)
    changes = check_invariant(model, progressive(4, 2))
    block = lambda i: [n for n, _ in model.named_parameters() if n.startswith(f"bert.encoder.layer.{i}.")]  # noqa: E731
    assert changes[0].stage == 0 and changes[0].previous is None
    assert changes[0].frozen == () and changes[0].unfrozen == ()
    assert changes[0].trainable_params == sum(p.numel() for p in model.parameters())
    assert changes[1].stage == 1 and changes[1].previous == 0
    assert changes[1].frozen == tuple(block(0) + block(1))
    assert changes[1].unfrozen == ()
    frozen_numel = sum(p.numel() for n, p in model.named_parameters() if n in changes[1].frozen)
    assert changes[1].trainable_params == sum(p.numel() for p in model.parameters()) - frozen_numel


def test_invariant_one_block_per_stage_embeddings_first_stage_only():
    model = tiny_model("bert", num_layers=4)
    changes = check_invariant(model, progressive(4, 4, embeddings="first_stage"))
    embeddings = [n for n, _ in model.named_parameters() if n.startswith("bert.embeddings.")]
    assert changes[1].frozen == tuple(embeddings + [n for n, _ in model.named_parameters()
                                                    if n.startswith("bert.encoder.layer.0.")])
    assert [c.stage for c in changes] == [0, 1, 2, 3]


def test_invariant_growing_schedule():
    model = tiny_model("bert", num_layers=4)
    changes = check_invariant(model, explicit(4, [[3], [2, 3], [0, 1, 2, 3]], embeddings="never"))
    names = [n for n, _ in model.named_parameters()]
    assert changes[1].frozen == ()
    assert changes[1].unfrozen == tuple(n for n in names if n.startswith("bert.encoder.layer.2."))
    lower = ("bert.encoder.layer.0.", "bert.encoder.layer.1.")
    assert changes[2].unfrozen == tuple(n for n in names if n.startswith(lower))


def test_invariant_with_lora():
    """PEFT: the base stays frozen; the LoRA matrices are frozen block by block; modules_to_save trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS",
                        init_lora_weights="gaussian")  # lora_B non-zero, so lora_A gets gradients from step 1
    model = get_peft_model(tiny_model("bert", num_layers=4), config)
    changes = check_invariant(model, progressive(4, 2))
    assert all(".lora_" in n for n in changes[1].frozen)
    assert len(changes[1].frozen) == 2 * 2 * 2  # blocks 0-1 x (query, value) x (A, B)


def test_method_frozen_parameters_never_become_trainable():
    model = tiny_model("bert", num_layers=4)
    kept_frozen = ["bert.encoder.layer.3.output.dense.weight", "bert.embeddings.word_embeddings.weight",
                   "classifier.bias"]
    params = dict(model.named_parameters())
    for name in kept_frozen:
        params[name].requires_grad_(False)
    check_invariant(model, explicit(4, [[3], [2, 3], [0, 1, 2, 3]]))  # block 3 trains in every stage
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    assert not set(kept_frozen) & set(freezer.method_trainable)
    for stage in range(2):
        freezer.apply(stage)
        assert not any(params[name].requires_grad for name in kept_frozen)
    freezer.restore()
    assert not any(params[name].requires_grad for name in kept_frozen)
    assert all(params[name].requires_grad for name in freezer.method_trainable)


def test_nothing_trainable_is_an_error():
    model = tiny_model("bert", num_layers=2)
    model.requires_grad_(False)
    with pytest.raises(ProgtuningError, match="no parameter of the model requires grad"):
        ProgressiveFreezer(model, progressive(2, 2))


def test_schedule_for_other_block_count_is_an_error():
    model = tiny_model("bert", num_layers=4)
    with pytest.raises(ProgtuningError, match="the schedule is for 6 blocks but the model has 4") as info:
        ProgressiveFreezer(model, progressive(6, 2))
    assert "\n" not in str(info.value)


def test_unknown_stage_is_an_error():
    freezer = ProgressiveFreezer(tiny_model("bert", num_layers=4), progressive(4, 2))
    with pytest.raises(ProgtuningError, match=r"stage 2 does not exist: the schedule has stages 0..1"):
        freezer.apply(2)


# -- apply_for_step ---------------------------------------------------------------------------------------
def test_apply_for_step_switches_once_and_reapplies_after_tampering():
    model = tiny_model("bert", num_layers=4)
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.1)
    first = freezer.apply_for_step(0, steps_per_epoch=5, total_steps=10, optimizer=optimizer)
    assert first is not None and first.stage == 0 and first.previous is None
    assert freezer.apply_for_step(4, 5, 10, optimizer) is None
    switch = freezer.apply_for_step(5, 5, 10, optimizer)
    assert switch is not None and (switch.stage, switch.previous) == (1, 0)
    assert freezer.apply_for_step(6, 5, 10, optimizer) is None
    frozen = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert not frozen.requires_grad
    frozen.requires_grad_(True)  # e.g. peft's set_adapter(), or user code
    again = freezer.apply_for_step(7, 5, 10, optimizer)
    assert again is not None and (again.stage, again.previous) == (1, 1)
    assert again.frozen == ("bert.encoder.layer.0.attention.self.query.weight",)
    assert not frozen.requires_grad
    assert freezer.apply_for_step(8, 5, 10, optimizer) is None


def test_apply_for_step_reapplies_after_peft_set_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("bert", num_layers=4), LoraConfig(r=2, target_modules=["query"]))
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    freezer.apply_for_step(1, steps_per_epoch=1, total_steps=2)
    lora0 = [p for n, p in model.named_parameters() if "layer.0." in n and ".lora_" in n]
    assert lora0 and not any(p.requires_grad for p in lora0)
    model.set_adapter("default")  # turns every adapter weight trainable again
    assert all(p.requires_grad for p in lora0)
    change = freezer.apply_for_step(1, steps_per_epoch=1, total_steps=2)
    assert change is not None and change.stage == 1
    assert not any(p.requires_grad for p in lora0)


# -- optimizer state ------------------------------------------------------------------------------------
def _populated_optimizer(model, freezer):
    optimizer = torch.optim.AdamW(freezer.trainable_parameters(), lr=0.1)
    model(**tiny_batch()).loss.backward()
    optimizer.step()
    return optimizer


def test_release_optimizer_state_plain():
    model = tiny_model("bert", num_layers=4)
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    optimizer = _populated_optimizer(model, freezer)
    assert len(optimizer.state) == len(freezer.method_trainable)
    block0 = [p for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.0.")]
    assert release_optimizer_state(optimizer, block0) == len(block0)
    assert not any(p in optimizer.state for p in block0)
    assert release_optimizer_state(optimizer, block0) == 0
    assert len(optimizer.state) == len(freezer.method_trainable) - len(block0)


def test_release_optimizer_state_through_accelerate_wrapper():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    model = tiny_model("bert", num_layers=4)
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    inner = _populated_optimizer(model, freezer)
    try:
        wrapped = Accelerator(cpu=True).prepare_optimizer(inner)
        assert isinstance(wrapped, AcceleratedOptimizer) and wrapped.optimizer is inner
        change = freezer.apply(1, wrapped)
        frozen = [dict(model.named_parameters())[n] for n in change.frozen]
        assert frozen and not any(p in inner.state for p in frozen)
        assert len(inner.state) == len(freezer.method_trainable) - len(frozen)
        head = dict(model.named_parameters())["classifier.weight"]
        assert head in inner.state
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# -- eval mode of frozen blocks ---------------------------------------------------------------------------
def _record_modes(model, layout):
    """Forward hooks that record, per block, whether any submodule ran in training mode."""
    seen: dict[int, bool] = {}
    handles = []
    for index, path in enumerate(layout.block_paths):
        block = model.get_submodule(path)

        def hook(module, args, output, index=index):
            seen[index] = any(m.training for m in module.modules())

        handles.append(block.register_forward_hook(hook))
    return seen, handles


def test_frozen_blocks_run_in_eval_mode_even_after_model_train():
    model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    freezer = ProgressiveFreezer(model, progressive(4, 2))
    seen, _ = _record_modes(model, freezer.layout)
    batch = tiny_batch()
    freezer.apply(0)
    model.train()
    model(**batch)
    assert seen == {0: True, 1: True, 2: True, 3: True}
    freezer.apply(1)
    model.train()  # what the Trainer does before every step
    model(**batch)
    assert seen == {0: False, 1: False, 2: True, 3: True}
    # frozen blocks are deterministic: the same input gives the same output in training mode,
    inputs = {}
    grab = model.bert.encoder.layer[1].register_forward_pre_hook(lambda m, a, k: inputs.update(a=a, k=k),
                                                                  with_kwargs=True)
    model(**batch)
    grab.remove()
    model.train()
    block1, block3 = model.bert.encoder.layer[1], model.bert.encoder.layer[3]
    first = block1(*inputs["a"], **inputs["k"])
    second = block1(*inputs["a"], **inputs["k"])
    first, second = (o[0] if isinstance(o, tuple) else o for o in (first, second))
    assert torch.equal(first, second)
    # while a trained block still runs with dropout on
    first = block3(*inputs["a"], **inputs["k"])
    second = block3(*inputs["a"], **inputs["k"])
    first, second = (o[0] if isinstance(o, tuple) else o for o in (first, second))
    assert not torch.equal(first, second)
    model.eval()
    model(**batch)
    assert seen == {0: False, 1: False, 2: False, 3: False}


def test_growing_schedule_unfrozen_block_trains_again():
    model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.5)
    freezer = ProgressiveFreezer(model, explicit(4, [[3], [2, 3], [0, 1, 2, 3]]))
    seen, _ = _record_modes(model, freezer.layout)
    batch = tiny_batch()
    model.train()
    freezer.apply(0)
    model(**batch)
    assert seen == {0: False, 1: False, 2: False, 3: True}
    freezer.apply(1)
    assert model.bert.encoder.layer[2].training  # back in the model's mode at the switch
    model(**batch)
    assert seen == {0: False, 1: False, 2: True, 3: True}
    freezer.apply(2)
    model(**batch)
    assert seen == {0: True, 1: True, 2: True, 3: True}


def test_eval_frozen_blocks_off_and_restore_and_close():
    model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.5)
    batch = tiny_batch()
    off = ProgressiveFreezer(model, progressive(4, 2), eval_frozen_blocks=False)
    seen, _ = _record_modes(model, off.layout)
    model.train()
    off.apply(1)
    model(**batch)
    assert seen == {0: True, 1: True, 2: True, 3: True}
    off.restore()
    off.close()

    freezer = ProgressiveFreezer(model, progressive(4, 2))
    freezer.apply(1)
    model(**batch)
    assert seen == {0: False, 1: False, 2: True, 3: True}
    freezer.restore()
    assert freezer.stage_index is None
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model(**batch)
    assert seen == {0: True, 1: True, 2: True, 3: True}
    freezer.apply(1)
    freezer.close()  # hooks gone: frozen blocks follow model.train() again
    model.train()
    model(**batch)
    assert seen == {0: True, 1: True, 2: True, 3: True}


def test_layout_can_be_passed_in():
    model = tiny_model("bert", num_layers=4)
    layout = find_blocks(model)
    freezer = ProgressiveFreezer(model, progressive(4, 2), layout)
    assert freezer.layout is layout


def test_frozen_embeddings_run_in_eval_mode_only_while_frozen():
    model = tiny_model("bert", num_layers=4, hidden_dropout_prob=0.1)
    freezer = ProgressiveFreezer(model, progressive(4, 2, "first_stage"))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.train()
    freezer.apply(0)
    model(**batch)
    assert model.bert.embeddings.training
    freezer.apply(1)
    model.train()
    model(**batch)
    assert not model.bert.embeddings.training and model.bert.encoder.layer[3].training
    freezer.restore()
    assert model.bert.embeddings.training  # follows the model's mode again
    freezer.close()
