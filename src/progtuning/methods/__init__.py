"""What can train: full fine-tuning, LoRA, bottleneck adapters, BitFit, any peft config, one module
each behind ``registry``; ``config`` holds every method setting, ``api`` applies, saves and reloads."""
