"""Checkpoint integrity: a sha256 for every file, written with the checkpoint and verified on resume.

Every checkpoint ``progtuning train`` writes holds ``SHA256SUMS`` (the format of ``sha256sum``, so
``cd checkpoint-24 && sha256sum -c SHA256SUMS`` checks it by hand). It is written last, into the
checkpoint's staging folder, before the folder is fsynced and renamed into place
(:class:`~progtuning.runs.checkpoints.ProgtuningTrainer`): a checkpoint and its sums appear together
or not at all.

:func:`select_checkpoint` picks the checkpoint a ``--resume`` continues from: the newest one whose
files all match their sums. A checkpoint that does not match (a flipped bit, a truncated or
missing file) is reported in one line as corrupt, renamed ``corrupt-checkpoint-N`` (kept for
inspection, never resumed from or rotated), and the one before it is used. A checkpoint without
``SHA256SUMS`` (written by the plain Trainer or an older progtuning) is used as it is, after the
structural checks of :func:`~progtuning.runs.checkpoints.check_checkpoint`.

Torch-free: resume is checked before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from progtuning.errors import ProgtuningError

SUMS = "SHA256SUMS"
CORRUPT_PREFIX = "corrupt-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` but the sums themselves, as sorted POSIX relative paths."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative != SUMS and not name.startswith(f".{SUMS}."):
                found.append(relative)
    return sorted(found)


def write_checksums(folder: str | Path) -> Path:
    """Write ``folder/SHA256SUMS`` for every file in ``folder`` (atomically: temp file, fsync, rename)."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _files(folder)]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{SUMS}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / SUMS)
    return folder / SUMS


def read_checksums(folder: str | Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` from ``folder/SHA256SUMS``, or None if there is none."""
    path = Path(folder) / SUMS
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if not match:
            raise ValueError(f"{SUMS} has a malformed line {line[:60]!r}")
        sums[match.group(2)] = match.group(1)
    return sums


def verify_checksums(folder: str | Path) -> str | None:
    """Why ``folder`` does not match its sums (one phrase), or None when it does or has no sums."""
    folder = Path(folder)
    try:
        sums = read_checksums(folder)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"its {SUMS} is unreadable ({error})"
    if sums is None:
        return None
    for name, expected in sums.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            actual = sha256_file(file)
        except OSError as error:
            return f"{name} cannot be read ({error.strerror})"
        if actual != expected:
            return f"{name} does not match its sha256 in {SUMS}"
    return None


def has_checksums(folder: str | Path) -> bool:
    return (Path(folder) / SUMS).is_file()


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), run_dir / name) for name in os.listdir(run_dir)
             if (m := _CHECKPOINT_RE.match(name)) and (run_dir / name).is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def select_checkpoint(run_dir: str | Path, rename_corrupt: bool | None = None, say=None) -> Path:
    """The newest checkpoint in ``run_dir`` whose files match their sums (see the module docstring).

    Each corrupt one on the way is reported through ``say`` (default: one line on stderr, from the
    first process only) and, with ``rename_corrupt`` (default: in the first process only), renamed
    ``corrupt-checkpoint-N``. Raises a one-line error when none is left.
    """
    from progtuning.errors import warn

    first = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank, known before any process group
    rename_corrupt = first if rename_corrupt is None else rename_corrupt
    say = say or warn
    candidates = checkpoints_newest_first(run_dir)
    if not candidates:
        raise ProgtuningError(f"--resume found no checkpoint in {run_dir}: run without --resume")
    corrupt: list[tuple[Path, str]] = []
    for checkpoint in candidates:
        problem = verify_checksums(checkpoint)
        if problem is None:
            if corrupt:
                say(f"resuming from {checkpoint.name}, the newest checkpoint that is intact "
                    f"({_describe(corrupt)})")
            return checkpoint
        moved = _set_aside(checkpoint) if rename_corrupt else checkpoint
        corrupt.append((moved, problem))
    raise ProgtuningError(
        f"every checkpoint in {run_dir} is corrupt ({_describe(corrupt)}): start again with --overwrite "
        "(or in a new --output-dir)"
    )


def _describe(corrupt: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{path.name.removeprefix(CORRUPT_PREFIX)} is corrupt: {problem}"
                     + (f", kept as {path}" if path.name.startswith(CORRUPT_PREFIX) else "")
                     for path, problem in corrupt)


def _set_aside(checkpoint: Path) -> Path:
    target = checkpoint.with_name(CORRUPT_PREFIX + checkpoint.name)
    if target.exists():
        target = Path(tempfile.mkdtemp(prefix=f"{CORRUPT_PREFIX}{checkpoint.name}.", dir=checkpoint.parent))
        target.rmdir()
    try:
        os.replace(checkpoint, target)
    except OSError:
        return checkpoint  # another process (rank) moved it first, or the folder is read-only: report it as is
    return target
