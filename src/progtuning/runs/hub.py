"""``--push-to-hub``: a finished run's model, card and results as one commit to a Hugging Face hub repository.

The repository gets the files of ``OUTPUT_DIR/model/`` at its root (so ``from_pretrained(repo_id)``
and ``AutoPeftModel.from_pretrained(repo_id)`` work), the model card (``README.md``) and
``results.json``. It is created if missing (``--hub-private`` makes it private); the token is
huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``), never a config key. ``--hub-model-id``
names it (``user/name`` or ``name``, which the hub puts under the token's user); the default is the
output folder's name.

Pushing needs the network: with ``HF_HUB_OFFLINE`` set, ``progtuning train --push-to-hub`` is refused
before training starts. A push that fails after training leaves the run as it is, and
``progtuning push OUTPUT_DIR`` tries again.
"""

from __future__ import annotations

import os
from pathlib import Path

from progtuning.errors import ProgtuningError
from progtuning.runs.results import MODEL_CARD_FILE, MODEL_DIR, RESULTS_FILE


def default_repo_id(output_dir: str | Path) -> str:
    return Path(output_dir).resolve().name


def check_can_push() -> None:
    """Refuse ``--push-to-hub`` at once when huggingface_hub is set to work offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ProgtuningError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set: unset it, or train "
                              "without --push-to-hub and run `progtuning push OUTPUT_DIR` later")


def push_run(output_dir: str | Path, repo_id: str | None = None, *, private: bool = False) -> str:
    """Upload the run in ``output_dir`` as one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    output_dir = Path(output_dir)
    model_dir = output_dir / MODEL_DIR
    if not model_dir.is_dir() or not (output_dir / RESULTS_FILE).is_file():
        raise ProgtuningError(f"{output_dir} has no saved model and results.json to push: give a finished run folder")
    repo_id = repo_id or default_repo_id(output_dir)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(model_dir).as_posix(), path_or_fileobj=str(path))
        for path in sorted(model_dir.rglob("*")) if path.is_file()
    ]
    for name in (MODEL_CARD_FILE, RESULTS_FILE):
        if (output_dir / name).is_file():
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name)))
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo.repo_id, operations=operations,
                                   commit_message=f"progtuning: {output_dir.name}")
    except OfflineModeIsEnabled:
        check_can_push()
        raise
    except (HfHubHTTPError, OSError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ProgtuningError(f"pushing {output_dir} to {repo_id} failed ({first}): check the token "
                              f"(HF_TOKEN or `hf auth login`) and the network, then `progtuning push {output_dir}`")
    return commit.commit_url
