"""Configs: YAML + overrides → a checked TrainConfig; every shipped config loads and names its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from progtuning.runs.config import TrainConfig, coerce, load_config, parse_overrides
from progtuning.errors import ProgtuningError

ROOT = Path(__file__).parent.parent
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweep" not in p.parts and "probe" not in p.parts)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_train_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# progtuning train {path.relative_to(ROOT)}"
    assert isinstance(load_config(path), TrainConfig)


def test_overrides_win_over_the_file_and_are_typed():
    config = load_config(
        ROOT / "configs/rotten-tomatoes/minilm-l6.yaml",
        parse_overrides(["--epochs", "4", "--method", "lora", "--no-progtuning", "--learning-rate=1e-3"]),
    )
    assert (config.epochs, config.method, config.progtuning, config.learning_rate) == (4.0, "lora", False, 1e-3)
    assert config.task == "rotten-tomatoes"  # from the file


def test_bool_flags_and_lists():
    overrides = parse_overrides(["--overwrite", "--stage-blocks", "[[5], [4, 5]]", "--lora-target-modules", "query,value"])
    assert overrides == {"overwrite": True, "stage_blocks": "[[5], [4, 5]]", "lora_target_modules": "query,value"}
    config = load_config(None, overrides)
    assert config.stage_blocks == [[5], [4, 5]] and config.lora_target_modules == ["query", "value"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "prefix"}, "unknown method 'prefix'"),
        ({"embeddings": "sometimes"}, "unknown embeddings policy"),
        ({"stage_unit": "batch"}, "unknown stage_unit"),
        ({"batch_size": "0"}, "batch_size must be at least 1"),
        ({"epochs": "many"}, "epochs expects float"),
        ({"overwrite": "perhaps"}, "overwrite expects bool"),
        ({"colour": "blue"}, "unknown config key(s) colour"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ProgtuningError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_python_object_tag_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"task: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ProgtuningError, match="not valid \\(safe\\) YAML"):
        load_config(evil)
    assert not marker.exists()


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ProgtuningError, match="must be a mapping"):
        load_config(path)


def test_override_needs_a_value():
    with pytest.raises(ProgtuningError, match="--epochs needs a value"):
        parse_overrides(["--epochs"])
    assert coerce("stages", "none") is None
