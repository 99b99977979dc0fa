"""The frozen-prefix cache: hidden states of the frozen lower blocks, computed once and reused.

Start at :mod:`progtuning.cache.prefix_cache`; the callback for the HF Trainer is in :mod:`progtuning.cache.callback`.
"""
