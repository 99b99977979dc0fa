"""A tiny ``progtuning train`` setup on disk: a 4-block BERT folder, its tokenizer, and a CSV task.

Shared by ``test_resume.py``, ``test_safety.py`` and ``test_distributed.py``, which run the real CLI
(in this process, or as subprocesses that can be killed). The model keeps BERT's default dropout
(0.1), so an exact resume really depends on the restored RNG state.

    model_dir, data_dir = make_tiny_setup(tmp_path)
    argv = train_argv(model_dir, data_dir, tmp_path / "run")   # ["train", "--task", "files", ...]
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

WORDS = ("the a movie film was is good bad great awful fine plot acting and but not very really boring fun "
         "story cast music ending scene").split()
POSITIVE = {"good", "great", "fine", "fun"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def make_tiny_setup(root: Path, num_layers: int = 4, train_rows: int = 32, dropout: float = 0.1) -> tuple[Path, Path]:
    """A model folder and a data folder (train.csv, validation.csv) under ``root``."""
    import transformers

    root = Path(root)
    model_dir, data_dir = root / ("tiny-bert" if dropout else "tiny-bert-no-dropout"), root / "data"
    if not model_dir.exists():
        vocab = {w: i for i, w in enumerate(SPECIAL + list(WORDS))}
        tokenizer = transformers.BertTokenizer(vocab=vocab)
        config = transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32, num_labels=2,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not data_dir.exists():
        data_dir.mkdir(parents=True)
        rng = random.Random(0)
        for name, rows in (("train.csv", train_rows), ("validation.csv", 8)):
            with open(data_dir / name, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                for _ in range(rows):
                    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
                    writer.writerow([" ".join(words), int(any(w in POSITIVE for w in words))])
    return model_dir, data_dir


def train_argv(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """``progtuning train`` arguments: 3 epochs x 8 steps (batch 4), 3 stages, a checkpoint per epoch."""
    return [
        "train", "--task", "files",
        "--train-file", str(data_dir / "train.csv"), "--validation-file", str(data_dir / "validation.csv"),
        "--model", str(model_dir), "--epochs", "3", "--batch-size", "4", "--max-length", "16",
        "--learning-rate", "1e-3", "--logging-steps", "1", "--threads", "1", "--seed", "0",
        "--output-dir", str(output_dir), *extra,
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_cli(argv: list[str], crash: str | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``progtuning`` in a subprocess, through ``crash_runner.py`` (``crash``: see that file)."""
    command = [sys.executable, str(TESTS / "crash_runner.py")]
    if crash:
        command += ["--crash", crash]
    return subprocess.run(command + ["--", *argv], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env))


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model" / "model.safetensors"))
