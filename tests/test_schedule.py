"""Schedules: parts, stage blocks, embedding policies, stage boundaries, validation, serialisation."""

from __future__ import annotations

import json
import math

import pytest

from progtuning.errors import ProgtuningError
from progtuning.core.schedule import Schedule, Stage, explicit, no_progtuning, progressive, split_into_parts


# -- parts and stage blocks ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_blocks", "num_parts", "parts"),
    [
        (12, 3, [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]),
        (12, 5, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9, 10, 11)]),  # leftover blocks go to the top part
        (6, 4, [(0,), (1,), (2,), (3, 4, 5)]),
        (4, 4, [(0,), (1,), (2,), (3,)]),
        (5, 1, [(0, 1, 2, 3, 4)]),
    ],
)
def test_split_into_parts(num_blocks, num_parts, parts):
    assert split_into_parts(num_blocks, num_parts) == parts


@pytest.mark.parametrize(
    ("num_blocks", "num_stages", "stage_blocks"),
    [
        (12, 3, [tuple(range(12)), tuple(range(4, 12)), (8, 9, 10, 11)]),
        (12, 5, [tuple(range(12)), tuple(range(2, 12)), tuple(range(4, 12)), tuple(range(6, 12)), (8, 9, 10, 11)]),
        (6, 4, [(0, 1, 2, 3, 4, 5), (1, 2, 3, 4, 5), (2, 3, 4, 5), (3, 4, 5)]),
        (12, 2, [tuple(range(12)), tuple(range(6, 12))]),
    ],
)
def test_progressive_stage_blocks(num_blocks, num_stages, stage_blocks):
    schedule = progressive(num_blocks, num_stages)
    assert schedule.num_blocks == num_blocks
    assert schedule.num_stages == num_stages
    assert [stage.blocks for stage in schedule.stages] == stage_blocks
    assert [stage.index for stage in schedule.stages] == list(range(num_stages))
    assert [stage.start for stage in schedule.stages] == [float(t) for t in range(num_stages)]
    assert schedule.unit == "epoch"
    assert schedule.name == "progressive"


@pytest.mark.parametrize(
    ("policy", "flags"),
    [
        ("always", [True, True, True]),
        ("first_stage", [True, False, False]),
        ("never", [False, False, False]),
    ],
)
def test_embedding_policies(policy, flags):
    schedule = progressive(12, 3, embeddings=policy)
    assert [stage.train_embeddings for stage in schedule.stages] == flags
    assert schedule.embeddings == policy


def test_default_embedding_policy_is_always():
    assert [s.train_embeddings for s in progressive(12, 3).stages] == [True, True, True]


def test_no_progtuning_is_one_stage_training_everything():
    schedule = no_progtuning(6)
    assert schedule.num_stages == 1
    assert schedule.stages[0] == Stage(index=0, blocks=(0, 1, 2, 3, 4, 5), train_embeddings=True, start=0.0)
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=30) == [30]


# -- epoch boundaries ------------------------------------------------------------------------------
def test_epoch_boundaries_planned_run():
    schedule = progressive(12, 3)
    assert schedule.stage_starts(steps_per_epoch=10, total_steps=30) == [0, 10, 20]
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=30) == [10, 10, 10]
    stages = [schedule.stage_at(step, steps_per_epoch=10, total_steps=30) for step in range(30)]
    assert stages == [0] * 10 + [1] * 10 + [2] * 10


def test_epoch_boundaries_run_longer_than_stages_keeps_last_stage():
    schedule = progressive(12, 3)
    assert schedule.stage_starts(steps_per_epoch=10, total_steps=50) == [0, 10, 20]
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=50) == [10, 10, 30]
    assert schedule.stage_at(49, steps_per_epoch=10, total_steps=50) == 2
    assert schedule.stage_at(35, steps_per_epoch=10, total_steps=50) == 2


def test_epoch_boundaries_run_shorter_than_planned():
    schedule = progressive(12, 3)
    # 1.5 epochs: stage 2 is never reached and counts zero steps.
    assert schedule.stage_starts(steps_per_epoch=10, total_steps=15) == [0, 10, 15]
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=15) == [10, 5, 0]
    assert [schedule.stage_at(s, 10, 15) for s in (0, 9, 10, 14)] == [0, 0, 1, 1]
    # exactly one epoch: only stage 0
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=10) == [10, 0, 0]
    assert schedule.stage_at(9, 10, 10) == 0


def test_epoch_boundaries_uneven_epoch():
    schedule = progressive(6, 4)
    assert schedule.stage_starts(steps_per_epoch=7, total_steps=28) == [0, 7, 14, 21]
    assert schedule.stage_lengths(steps_per_epoch=7, total_steps=28) == [7, 7, 7, 7]
    assert [schedule.stage_at(s, 7, 28) for s in (6, 7, 13, 14, 20, 21, 27)] == [0, 1, 1, 2, 2, 3, 3]


def test_explicit_epoch_starts():
    schedule = explicit(4, [[0, 1, 2, 3], [2, 3]], starts=[0, 2])
    assert schedule.stage_starts(steps_per_epoch=5, total_steps=15) == [0, 10]
    assert schedule.stage_lengths(steps_per_epoch=5, total_steps=15) == [10, 5]


# -- fraction boundaries --------------------------------------------------------------------------
def test_fraction_boundaries_one_epoch_run():
    schedule = progressive(12, 3, unit="fraction")
    assert [s.start for s in schedule.stages] == [0.0, 1 / 3, 2 / 3]
    assert schedule.stage_starts(steps_per_epoch=10, total_steps=10) == [0, 3, 6]
    assert schedule.stage_lengths(steps_per_epoch=10, total_steps=10) == [3, 3, 4]
    assert [schedule.stage_at(s, 10, 10) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_fraction_boundaries_max_steps_run():
    schedule = progressive(12, 3, unit="fraction")
    # steps_per_epoch plays no part for fractions (e.g. an IterableDataset with max_steps=300)
    assert schedule.stage_starts(steps_per_epoch=300, total_steps=300) == [0, 100, 200]
    assert schedule.stage_starts(steps_per_epoch=7, total_steps=100) == [0, 33, 66]
    assert schedule.stage_lengths(steps_per_epoch=7, total_steps=100) == [33, 33, 34]


def test_fraction_explicit_starts():
    schedule = progressive(8, 3, unit="fraction", starts=[0, 0.5, 0.75])
    assert schedule.stage_starts(steps_per_epoch=4, total_steps=8) == [0, 4, 6]
    assert schedule.stage_lengths(steps_per_epoch=4, total_steps=8) == [4, 2, 2]


def test_stage_starts_rejects_empty_epoch():
    with pytest.raises(ProgtuningError, match="steps_per_epoch >= 1"):
        progressive(12, 3).stage_starts(steps_per_epoch=0, total_steps=10)


# -- explicit schedules ---------------------------------------------------------------------------
def test_explicit_growing_schedule():
    schedule = explicit(4, [[3], [2, 3], [0, 1, 2, 3]])
    assert [s.blocks for s in schedule.stages] == [(3,), (2, 3), (0, 1, 2, 3)]
    assert [s.start for s in schedule.stages] == [0.0, 1.0, 2.0]
    assert [s.train_embeddings for s in schedule.stages] == [True, True, True]
    assert schedule.name == "explicit"


def test_explicit_top_down_schedule_accepts_ranges_and_normalises():
    schedule = explicit(12, [[11, 10, 9, 9], range(6, 12), range(12)], embeddings="never")
    assert [s.blocks for s in schedule.stages] == [(9, 10, 11), tuple(range(6, 12)), tuple(range(12))]
    assert [s.train_embeddings for s in schedule.stages] == [False, False, False]


# -- validation: every user mistake is a one-line ProgtuningError ---------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: progressive(2, 3), "3 stages need at least 3 blocks"),
        (lambda: progressive(4, 0), "at least 1"),
        (lambda: split_into_parts(3, 4), "4 stages need at least 4 blocks"),
        (lambda: explicit(4, [[0, 4]]), r"block\(s\) \[4\]"),
        (lambda: explicit(4, [[-1, 2]]), r"block\(s\) \[-1\]"),
        (lambda: explicit(4, [[0, 1], []]), "stage 1 trains no block"),
        (lambda: explicit(4, []), "at least one stage"),
        (lambda: explicit(0, [[0]]), "at least one block"),
        (lambda: progressive(4, 2, embeddings="sometimes"), "unknown embedding policy 'sometimes'"),
        (lambda: explicit(4, [[0]], embeddings="Always"), "unknown embedding policy"),
        (lambda: progressive(4, 2, unit="step"), "unknown stage unit 'step'"),
        (lambda: progressive(4, 2, unit="fraction", starts=[0, 0]), "strictly increasing"),
        (lambda: progressive(6, 3, unit="fraction", starts=[0, 0.6, 0.4]), "strictly increasing"),
        (lambda: progressive(4, 2, starts=[1, 0]), "first stage must start at 0"),
        (lambda: progressive(4, 2, unit="fraction", starts=[0, 1.0]), r"in \[0, 1\)"),
        (lambda: progressive(4, 2, unit="fraction", starts=[0, 1.5]), r"in \[0, 1\)"),
        (lambda: progressive(4, 2, unit="fraction", starts=[0.25, 0.5]), "first stage must start at 0"),
        (lambda: progressive(4, 2, starts=[1, 2]), "first stage must start at 0"),
        (lambda: progressive(4, 2, starts=[0]), "got 1 stage starts for 2 stages"),
        (lambda: progressive(4, 2, starts=[0, 1, 2]), "got 3 stage starts for 2 stages"),
        (lambda: explicit(4, [[0], [1]], starts=[0]), "got 1 stage starts for 2 stages"),
        (lambda: Schedule.from_dict({"num_blocks": 4, "stages": [
            {"blocks": [0], "train_embeddings": True, "start": 0},
            {"blocks": [9], "train_embeddings": True, "start": 1},
        ]}), r"block\(s\) \[9\]"),
    ],
)
def test_validation_errors(build, message):
    with pytest.raises(ProgtuningError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_validation_rejects_non_finite_starts(bad):
    data = {
        "num_blocks": 4,
        "stages": [
            {"blocks": [0, 1, 2, 3], "train_embeddings": True, "start": 0.0},
            {"blocks": [2, 3], "train_embeddings": True, "start": bad},
        ],
    }
    with pytest.raises(ProgtuningError, match="finite"):
        Schedule.from_dict(data)


# -- serialisation and fingerprint -------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [
        progressive(12, 3),
        progressive(12, 5, embeddings="first_stage"),
        progressive(6, 4, embeddings="never", unit="fraction"),
        explicit(4, [[3], [2, 3], [0, 1, 2, 3]], starts=[0, 1.5, 2]),
        no_progtuning(3),
    ],
)
def test_to_dict_from_dict_round_trip(schedule):
    data = schedule.to_dict()
    back = Schedule.from_dict(json.loads(json.dumps(data)))
    assert back == schedule
    assert back.fingerprint() == schedule.fingerprint()
    assert back.to_dict() == data


def test_to_dict_content():
    assert progressive(4, 2, embeddings="first_stage").to_dict() == {
        "name": "progressive",
        "num_blocks": 4,
        "unit": "epoch",
        "embeddings": "first_stage",
        "stages": [
            {"blocks": [0, 1, 2, 3], "train_embeddings": True, "start": 0.0},
            {"blocks": [2, 3], "train_embeddings": False, "start": 1.0},
        ],
    }


def test_fingerprint_changes_when_schedule_changes():
    base = progressive(12, 3)
    variants = [
        progressive(12, 2),
        progressive(12, 4),
        progressive(24, 3),
        progressive(12, 3, embeddings="first_stage"),
        progressive(12, 3, embeddings="never"),
        progressive(12, 3, unit="fraction"),
        progressive(12, 3, starts=[0, 1, 3]),
        explicit(12, [range(12), range(4, 12), range(9, 12)]),
    ]
    prints = {base.fingerprint()} | {v.fingerprint() for v in variants}
    assert len(prints) == len(variants) + 1
    assert base.fingerprint() == progressive(12, 3).fingerprint()  # stable for the same schedule
    assert len(base.fingerprint()) == 16


def test_describe_lists_stages():
    assert progressive(4, 2).describe() == [
        {"index": 0, "blocks": (0, 1, 2, 3), "train_embeddings": True, "start": 0.0},
        {"index": 1, "blocks": (2, 3), "train_embeddings": True, "start": 1.0},
    ]


def test_schedule_is_pure_data():
    # no torch needed: the module must import and work without it (checked by module contents)
    import progtuning.core.schedule as module

    assert "torch" not in vars(module)
    assert math.isclose(progressive(12, 3, unit="fraction").stages[2].start, 2 / 3)
