"""Progtuning for training frameworks other than the Hugging Face Trainer (each an optional extra).

* :mod:`progtuning.integrations.lightning` — a PyTorch Lightning ``BaseFinetuning`` callback
  (``pip install 'progtuning[lightning]'``).

Arrows point down: these modules use :mod:`progtuning.core` and nothing above it.
"""
