"""Causal language modelling for decoders (GPT-2, Llama, Qwen2, Mistral, ...): plain text and instructions.

One kind, :class:`CausalLMTask`, in two formats. Sources (:mod:`progtuning.tasks.lmfiles` for the
user's files, :mod:`progtuning.tasks.builtin_lm` for the offline data) hand it raw rows:

* ``text``: rows with a ``text`` column; every token carries loss. With ``packing`` the split's
  examples are tokenized, an end-of-sequence token appended to each, joined and cut into
  ``max_length`` blocks, as transformers' ``run_clm`` example does (the last, shorter block is
  kept; tokens attend across the example boundaries inside a block). Without packing each example
  is one sequence, cut at ``max_length``.
* ``instruction``: rows with a ``messages`` column, a conversation: a list of ``{"role", "content"}``
  turns (roles ``system``, ``user``, ``assistant``) that ends with an assistant turn; a
  ``prompt``/``response`` pair is ``[user, assistant]``. It is rendered with the tokenizer's chat
  template; a tokenizer without one gets :data:`PLAIN_CHAT_TEMPLATE`, which is saved with the model,
  so the fine-tuned model is prompted the way it was trained. Loss is on the assistant turns only
  (their text and the end-of-turn marker the template puts after it); every other token has label
  -100. The assistant text is located by rendering each prefix of the conversation with the
  template (it must be a prefix of the whole rendering, as with every common template) and mapping
  characters to tokens through the fast tokenizer's offsets. A conversation longer than
  ``max_length`` is refused: cutting it would cut its response.

Scores (:meth:`CausalLMTask.evaluate`), per split:

* ``loss``: the mean negative log-likelihood per predicted token over the whole split (weighted by
  tokens; the Trainer's ``eval_loss`` in the training log is a mean of batch means),
  ``perplexity`` = exp(loss), and ``tokens``, how many tokens were predicted.
* instruction data also gets a generation check on the split's first ``generate_examples``
  conversations: greedy decoding (no sampling, one beam) of at most ``max_new_tokens`` tokens from
  the conversation without its last turn, stopping at the end-of-sequence token, scored against
  that last turn by :func:`~progtuning.tasks.metrics.generation_scores` (``exact_match``,
  ``token_f1``, fractions in 0..1).

The model is ``AutoModelForCausalLM`` with its pretrained LM head. :meth:`CausalLMTask.load_model`
refuses a checkpoint that is not a decoder language model (an encoder, a sequence classifier, an
encoder-decoder); :meth:`CausalLMTask.check_model` refuses a ``max_length`` beyond the model's
positions and ``--cache-frozen`` (see :data:`CACHE_REFUSAL`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from progtuning.errors import ProgtuningError
from progtuning.tasks.base import Features, Settings, Task, fingerprint, scored_splits
from progtuning.tasks.metrics import generation_scores

logger = logging.getLogger("progtuning")

FORMATS = ("text", "instruction")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label that carries no loss (transformers' and torch's convention)

# For tokenizers without a chat template (GPT-2, base Llama checkpoints). The generation prompt ends
# in a newline, so the response's first token never merges with a prompt character.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ':\\n' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\\n' }}{%- endif -%}"
)

CACHE_REFUSAL = (
    "--cache-frozen does not apply to decoder language models: the frozen-prefix cache feeds stored states "
    "into bidirectional encoder blocks only, and with tied embeddings the input table is the output head, "
    "which trains in every stage; run without --cache-frozen"
)

# Checkpoint classes that are decoder language models (LlamaForCausalLM, GPT2LMHeadModel, ...).
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Evaluation runs in micro-batches whose logits (rows x length x vocabulary x 4 bytes) stay below this.
_LOGITS_BUDGET_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# conversations


def conversation_problem(messages: Any) -> str | None:
    """Why ``messages`` cannot train (one phrase for an error message), or None if it can."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "'messages' is not a non-empty list of {role, content} turns"
    seen_user = False
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or not {"role", "content"} <= set(turn):
            return f"turn {number} of 'messages' is not an object with 'role' and 'content'"
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            return f"turn {number} has role {role!r} (use system, user or assistant)"
        if not isinstance(content, str):
            return f"turn {number} has no text content"
        if role == "user":
            seen_user = True
        if role == "assistant":
            if not seen_user:
                return f"turn {number} is an assistant response with no user turn before it"
            if not content.strip():
                return f"turn {number} is an empty assistant response"
    if messages[-1]["role"] != "assistant":
        return f"the last turn is the {messages[-1]['role']}'s, not an assistant response"
    return None


def as_messages(prompt: str, response: str, system: str | None = None) -> list[dict[str, str]]:
    """A prompt/response pair (and an optional system message) as a conversation."""
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template :data:`PLAIN_CHAT_TEMPLATE` (saved with it)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def _clean(messages: Sequence[dict]) -> list[dict[str, str]]:
    # datasets gives every turn every key any turn had (missing ones as None): keep role and content
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_conversation(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, and the character spans that carry loss.

    A span runs from the end of the rendering of the turns before an assistant turn plus the
    generation prompt, to the end of the rendering through that turn.
    """
    messages = _clean(messages)
    full = _render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ProgtuningError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} renders a conversation "
                "differently from its beginning, so its responses cannot be located: use a prompt/response format "
                "this template renders as a prefix, or a tokenizer with another template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(tokenizer: Any, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and their labels: the id on assistant tokens, -100 elsewhere."""
    text, spans = render_conversation(tokenizer, messages)
    # The template writes the special tokens it wants (BOS included), as apply_chat_template(tokenize=True) does.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation without its last turn, plus the template's generation prompt."""
    text = _render(tokenizer, _clean(messages)[:-1], add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# batching


@dataclass
class CausalLMCollator:
    """Pads a batch on the right to its longest row: ``pad_token_id`` in the inputs, mask 0, label -100.

    Right padding keeps each row's positions 0, 1, ... (Llama-style models number positions from the
    first column, not from the first real token). Labels are padded with -100 rather than derived from
    the inputs, so an end-of-sequence token that doubles as the pad token still carries loss.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(sequences: Sequence[Sequence[int]], block: int) -> list[list[int]]:
    """Join ``sequences`` and cut the stream into blocks of ``block`` tokens (the last may be shorter;
    a last block of one token is dropped: it predicts nothing)."""
    stream = [token for sequence in sequences for token in sequence]
    blocks = [stream[i : i + block] for i in range(0, len(stream), block)]
    return [b for b in blocks if len(b) > 1]


# ---------------------------------------------------------------------------------------------
# the task


@dataclass(frozen=True, kw_only=True)
class CausalLMTask(Task):
    """Causal language modelling on ``text`` rows or ``instruction`` conversations (module docstring)."""

    name: str
    format: str  # "text" or "instruction"
    packing: bool = False  # text only: pack examples into max_length blocks
    main_metric: str = ""  # default: exact_match for instructions, perplexity for text
    eval_splits: tuple[str, ...] = ("validation",)
    max_new_tokens: int = 32  # instruction: tokens generated per evaluated prompt
    generate_examples: int = 100  # instruction: prompts generated per evaluation split (0: none)
    description: str = ""
    extra: dict = field(default_factory=dict)

    kind: ClassVar[str] = "causal_lm"
    task_type: ClassVar[str] = "causal_lm"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ProgtuningError(f"unknown language-model format {self.format!r}: use {' or '.join(FORMATS)}")
        if self.packing and self.format != "text":
            raise ProgtuningError("packing applies to plain text; instruction conversations train one per sequence: drop --packing")
        if self.max_new_tokens < 1:
            raise ProgtuningError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.generate_examples < 0:
            raise ProgtuningError(f"generate_examples must be 0 or more, got {self.generate_examples}")
        if not self.main_metric:
            object.__setattr__(self, "main_metric", "exact_match" if self.generates else "perplexity")

    @property
    def generates(self) -> bool:
        """Whether evaluation runs the generation check."""
        return self.format == "instruction" and self.generate_examples > 0

    @property
    def column(self) -> str:
        return "text" if self.format == "text" else "messages"

    # -- data ------------------------------------------------------------------------------------
    def check(self, data) -> None:
        fix = "a text file gives 'text'; a JSONL gives prompt/response or messages"
        self.check_splits(data, (self.column,), fix)
        for split, dataset in data.items():
            for row, value in enumerate(dataset[self.column], start=1):
                problem = _text_problem(value) if self.format == "text" else conversation_problem(value)
                if problem:
                    raise ProgtuningError(f"{split} row {row} of {self.name}: {problem}; fix or drop the row")

    def preprocess(self, data, tokenizer, settings: Settings) -> Features:
        if not getattr(tokenizer, "is_fast", False):
            raise ProgtuningError(
                f"{type(tokenizer).__name__} is a slow tokenizer: language-model tasks need a fast one "
                "(tokenizer.json), for character offsets"
            )
        if tokenizer.eos_token_id is None:
            raise ProgtuningError("the tokenizer has no end-of-sequence token: set tokenizer.eos_token and save it")
        max_length = settings.max_length
        if self.format == "instruction":
            ensure_chat_template(tokenizer)
        encode = self._encode_text if self.format == "text" else self._encode_instructions
        splits = scored_splits(self, data)
        train = encode(data["train"], tokenizer, max_length, "train")
        evals = {split: encode(data[split], tokenizer, max_length, split) for split in splits}
        extra: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id}
        if self.generates:
            extra["generation"] = {}
            for split in splits:
                rows = data[split].select(range(min(self.generate_examples, len(data[split]))))
                conversations = [_clean(m) for m in rows["messages"]]
                extra["generation"][split] = {
                    "prompts": [prompt_ids(tokenizer, m) for m in conversations],
                    "references": [m[-1]["content"] for m in conversations],
                }
        return Features(train, evals, data, extra)

    def _encode_text(self, dataset, tokenizer, max_length: int, split: str):
        import datasets

        eos = tokenizer.eos_token_id

        def encode(batch):
            ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
            return {"input_ids": [list(row) + [eos] for row in ids]}

        encoded = dataset.map(
            encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {split}",
            new_fingerprint=fingerprint(dataset, tokenizer, "causal-lm-text", eos),
        )
        if self.packing:
            rows = pack(encoded["input_ids"], max_length)
        else:
            rows = [row[:max_length] for row in encoded["input_ids"]]
            cut = sum(len(row) > max_length for row in encoded["input_ids"])
            if cut:
                logger.info("%d of %d %s examples cut at max_length=%d tokens", cut, len(rows), split, max_length)
        return datasets.Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": [list(r) for r in rows]}
        )

    def _encode_instructions(self, dataset, tokenizer, max_length: int, split: str):
        template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]

        def encode(batch):
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for messages in batch["messages"]:
                ids, labels = encode_conversation(tokenizer, messages)
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(labels)
            return out

        encoded = dataset.map(
            encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {split}",
            new_fingerprint=fingerprint(dataset, tokenizer, "causal-lm-instruction", template),
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        too_long = [row for row, n in enumerate(lengths, start=1) if n > max_length]
        if too_long:
            first = too_long[0]
            raise ProgtuningError(
                f"{len(too_long)} of {len(lengths)} {split} conversations are longer than max_length={max_length} "
                f"tokens (row {first}: {lengths[first - 1]} tokens): raise --max-length or shorten them"
            )
        silent = [row for row, labels in enumerate(encoded["labels"], start=1) if all(x == IGNORE_INDEX for x in labels)]
        if silent:
            raise ProgtuningError(
                f"{split} row {silent[0]}: no response token carries loss after tokenizing: check its assistant turns"
            )
        return encoded

    def collator(self, tokenizer) -> CausalLMCollator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return CausalLMCollator(pad)

    # -- model -------------------------------------------------------------------------------------
    def model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, path: str, **kwargs: Any):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        architectures = list(getattr(config, "architectures", None) or [])
        if getattr(config, "is_encoder_decoder", False) or (
            architectures and not any(a.endswith(_CAUSAL_LM_SUFFIXES) for a in architectures)
        ):
            kind = architectures[0] if architectures else f"{config.model_type} encoder-decoder"
            raise ProgtuningError(
                f"{path} holds a {kind}, not a decoder language model (a ...ForCausalLM): language-model tasks need one, "
                "e.g. smollm2-135m or a GPT-2, Llama, Qwen2 or Mistral checkpoint"
            )
        try:
            return self.model_class().from_pretrained(path, **kwargs)
        except ValueError as error:
            if "Unrecognized configuration class" not in str(error):
                raise
            raise ProgtuningError(
                f"transformers has no causal language-model class for model type {config.model_type!r}: "
                "use a decoder (GPT-2, Llama, Qwen2, Mistral, ...)"
            ) from None

    def check_model(self, model, settings: Any) -> None:
        if getattr(settings, "cache_frozen", False) is True:  # asked for; a preset's "where it can" (None) is not
            raise ProgtuningError(CACHE_REFUSAL)
        limit = max_positions(model)
        if limit is not None and settings.max_length > limit:
            raise ProgtuningError(
                f"max_length={settings.max_length} is longer than this model takes ({limit} positions): "
                f"use --max-length {limit} or less"
            )

    # -- scores ----------------------------------------------------------------------------------
    def evaluate(self, trainer, features: Features, split: str) -> dict[str, float]:
        model = trainer.model
        batch_size = trainer.args.per_device_eval_batch_size
        collator = CausalLMCollator(features.extra["pad_token_id"])
        scores = token_nll(model, features.eval[split], collator, batch_size)
        generation = features.extra.get("generation", {}).get(split)
        if generation and generation["prompts"]:
            tokenizer = trainer.processing_class
            texts = greedy_generate(model, tokenizer, generation["prompts"], self.max_new_tokens, batch_size)
            scores.update(generation_scores(texts, generation["references"]))
            for text, reference in list(zip(texts, generation["references"]))[:3]:
                logger.info("%s: generated %r for reference %r", split, text, reference)
        return scores

    def summary(self, data) -> dict[str, Any]:
        return {
            **super().summary(data),
            "format": self.format,
            "packing": self.packing,
            "greater_is_better": self.main_metric not in ("loss", "perplexity"),
        }


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "the text is empty"
    return None


def max_positions(model) -> int | None:
    """How many positions the model takes (``max_position_embeddings`` / ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# evaluation


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(model, dataset, collator: CausalLMCollator, batch_size: int) -> dict[str, float]:
    """Mean negative log-likelihood per predicted token (label != -100) over ``dataset``; perplexity."""
    was_training = model.training
    model.eval()
    device = _device(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    total, count = 0.0, 0
    rows = [dataset[i] for i in range(len(dataset))]
    try:
        start = 0
        while start < len(rows):
            longest = max(len(r["input_ids"]) for r in rows[start : start + batch_size])
            step = max(1, min(batch_size, _LOGITS_BUDGET_BYTES // (longest * vocab * 4)))
            batch = collator(rows[start : start + step])
            start += step
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"].to(device)[:, 1:]  # token t predicts token t+1
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(losses)
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ProgtuningError("no token to score in this split: every label is -100")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count)}


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (no sampling, one beam) of token-id prompts, decoded without special tokens.

    Prompts run in batches of similar length, padded on the left (what ``generate`` expects of a
    decoder); each stops at an end-of-sequence token or after ``max_new_tokens``.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    stop.discard(None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                ids[row, longest - n :] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
                mask[row, longest - n :] = 1
            output = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=sorted(stop), pad_token_id=pad,
            )
            for row, i in enumerate(chunk):
                texts[i] = tokenizer.decode(output[row, longest:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return texts
