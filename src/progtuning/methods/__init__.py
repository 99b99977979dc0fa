"""What can train: full fine-tuning, LoRA, bottleneck adapters, BitFit, any peft config."""
