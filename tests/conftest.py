"""Shared test helpers: tiny randomly initialised models for every supported architecture.

Everything here is prefixed ``tiny_`` because this file is shared by every test module.

* :func:`tiny_config` builds a config (hidden 32, 2 heads, vocab 100, dropout off) for one of
  :data:`TINY_ARCHS`; :func:`tiny_model` builds the model from it with a fixed seed.
* :func:`tiny_dataset` is a ``datasets.Dataset`` of random token ids and labels, fixed length
  (so the default collator needs no padding).
* :func:`tiny_batch` is one batch of the same kind, as tensors.
* The ``tiny_bert`` fixture is a fresh 4-block BERT sequence classifier.

The helpers are plain functions: import them with ``from conftest import tiny_model`` (``tests/`` has
no ``__init__.py``, so pytest puts it on ``sys.path``). Intra-op threads are set to 1 (see below).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine they lose a lot
# (measured: 12 forward+backward passes of a 4-block BERT, 0.93 s with 2 threads, 0.15 s with 1).
torch.set_num_threads(int(os.environ.get("PROGTUNING_TEST_THREADS", "1")))

TINY_VOCAB = 100
TINY_HIDDEN = 32

# Every architecture tiny_config() can build (the ones progtuning supports).
TINY_ARCHS = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "deberta-v2",
    "mpnet",
    "gpt2",
    "llama",
    "qwen2",
    "t5",
)


def tiny_config(arch: str, num_layers: int = 4, num_labels: int = 2, **overrides):
    """A tiny config for ``arch``: hidden 32, 2 heads, vocab 100, dropout 0, ``num_layers`` blocks."""
    import transformers as tf

    bert_like = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    decoder_like = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "bert":
        kwargs, cls = bert_like, tf.BertConfig
    elif arch == "roberta":
        kwargs, cls = dict(bert_like, pad_token_id=1), tf.RobertaConfig
    elif arch == "xlm-roberta":
        kwargs, cls = dict(bert_like, pad_token_id=1), tf.XLMRobertaConfig
    elif arch == "electra":
        kwargs, cls = dict(bert_like, embedding_size=16), tf.ElectraConfig
    elif arch == "deberta-v2":
        # relative attention as in DeBERTa-v3: the shared rel_embeddings + LayerNorm sit in the encoder.
        kwargs = dict(bert_like, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm",
                      pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False)
        cls = tf.DebertaV2Config
    elif arch == "mpnet":
        kwargs, cls = bert_like, tf.MPNetConfig
    elif arch == "distilbert":
        kwargs = dict(vocab_size=TINY_VOCAB, dim=TINY_HIDDEN, n_layers=num_layers, n_heads=2, hidden_dim=64,
                      max_position_embeddings=64, num_labels=num_labels, dropout=0.0, attention_dropout=0.0,
                      seq_classif_dropout=0.0)
        cls = tf.DistilBertConfig
    elif arch == "gpt2":
        kwargs = dict(vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=num_layers, n_head=2, n_positions=64,
                      num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = tf.GPT2Config
    elif arch == "llama":
        kwargs, cls = decoder_like, tf.LlamaConfig
    elif arch == "qwen2":
        kwargs, cls = decoder_like, tf.Qwen2Config
    elif arch == "t5":
        kwargs = dict(vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, d_kv=16, d_ff=64, num_layers=num_layers,
                      num_decoder_layers=num_layers, num_heads=2, num_labels=num_labels, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        cls = tf.T5Config
    else:
        raise ValueError(f"no tiny config for {arch!r}; known: {TINY_ARCHS}")
    kwargs = dict(kwargs)
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(arch: str = "bert", num_layers: int = 4, task: str = "seq-cls", seed: int = 0, **overrides):
    """A tiny randomly initialised model (``task``: "seq-cls", "qa", "seq2seq" or "causal-lm")."""
    import transformers as tf

    auto = {
        "seq-cls": tf.AutoModelForSequenceClassification,
        "qa": tf.AutoModelForQuestionAnswering,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        "causal-lm": tf.AutoModelForCausalLM,
    }[task]
    config = tiny_config(arch, num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    return auto.from_config(config)


def tiny_dataset(n: int = 16, seq_len: int = 8, num_labels: int = 2, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` random fixed-length token-id rows with labels."""
    import datasets

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY_VOCAB, (n, seq_len), generator=generator)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    return datasets.Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones(n, seq_len, dtype=torch.long).tolist(),
            "labels": labels.tolist(),
        }
    )


def tiny_batch(n: int = 4, seq_len: int = 8, num_labels: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One batch of random token ids, attention mask and labels, as tensors."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, TINY_VOCAB, (n, seq_len), generator=generator),
        "attention_mask": torch.ones(n, seq_len, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (n,), generator=generator),
    }


@pytest.fixture
def tiny_bert():
    """A fresh 4-block BERT sequence classifier (seed 0, dropout off)."""
    return tiny_model("bert", num_layers=4)
