"""Tiny decoder language models on disk, with a word-level fast tokenizer, and small LM data files.

Shared by the language-model tests (``test_lm*.py``), which run the real CLI on them::

    model_dir = make_tiny_lm(tmp_path, "llama", tie=True, chat=True)
    write_instructions(tmp_path / "train.jsonl", 24)

The tokenizer knows :data:`WORDS` plus punctuation; ``chat=True`` gives it a ChatML-style template
(``<|im_start|>role\\n...<|im_end|>\\n``, end-of-sequence ``<|im_end|>``), ``chat=False`` none (so
progtuning's plain template is used). The instruction data is learnable: "is <word> good or bad ?"
→ "good" / "bad" by the word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

GOOD = ("fun", "great", "fine", "nice", "cool")
BAD = ("awful", "boring", "poor", "dull", "sad")
WORDS = ("is", "good", "bad", "or", "the", "a", "movie", "film", "was", "and", "story", "plot", "cast", "music",
         "user", "assistant", "system", "User", "Assistant", "System", *GOOD, *BAD)
PUNCTUATION = (":", "?", ".", ",", "!", "'")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(chat: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` (vocabulary under 64 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(special + list(WORDS) + list(PUNCTUATION))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>",
        eos_token="<|im_end|>" if chat else "</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>", "</s>"],
    )
    if chat:
        tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny_lm(root: Path, arch: str = "llama", *, tie: bool = True, chat: bool = True, num_layers: int = 4,
                 head: str = "causal-lm", seed: int = 0) -> Path:
    """A tiny randomly initialised decoder (``arch``: llama, gpt2, qwen2) saved with its tokenizer."""
    from conftest import tiny_config
    import transformers

    folder = Path(root) / f"tiny-{arch}-{'tied' if tie else 'untied'}-{'chat' if chat else 'plain'}-{head}"
    if folder.exists():
        return folder
    tokenizer = tiny_tokenizer(chat)
    config = tiny_config(arch, num_layers=num_layers, tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if head == "causal-lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(GOOD + BAD)
        rows.append({"prompt": f"is {word} good or bad ?", "response": "good" if word in GOOD else "bad"})
    return rows


def write_instructions(path: Path, n: int, seed: int = 0, rows: list[dict] | None = None) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in (rows if rows is not None else instruction_rows(n, seed))))
    return path


def write_text(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS[4:]) for _ in range(rng.randint(3, 9))) + " ." for _ in range(n)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
