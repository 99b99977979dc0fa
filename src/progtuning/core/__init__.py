"""The engine: schedules, block discovery, freezing, counting, the Trainer callback, DDP. Needs torch + transformers only."""
