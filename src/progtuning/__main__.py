"""`python -m progtuning ...` is the `progtuning` command (also under torchrun / accelerate launch)."""

from progtuning.runs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
