"""The run folder: what progtuning may write there, what ``--overwrite`` may delete, and clean failures.

A run folder holds a manifest, ``progtuning-files.json``, written before anything else. It lists
the names progtuning writes at the top of the folder (:data:`OWNED`: ``results.json``, ``README.md``, ``model/``,
``checkpoints/``, ...; everything inside those folders is progtuning's). ``--overwrite`` then
deletes exactly those names, and only in a folder that has the manifest and holds nothing else:
a folder with a file progtuning did not write (``my.csv``, ``notes/``), or without a manifest, is
refused in one line and left as it is. So ``--output-dir . --overwrite`` can never empty the
current folder (Hugging Face's ``overwrite_output_dir`` never deletes anything either).

* :func:`check_output_dir` — before anything loads: the path is not a file or under a file, can be
  written, and is empty, resumable, or replaceable as above.
* :func:`claim` — creates the folder (and missing parents) and writes the manifest; with
  ``--overwrite`` it first deletes the previous run's files.
* :func:`release_if_unused` — after a failure that left no checkpoint, results or model, removes
  what :func:`claim` created, so an early error leaves no empty output folder behind.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from progtuning.errors import ProgtuningError

MANIFEST = "progtuning-files.json"
FORMAT = "progtuning-files-1"
# Top-level names a run (or a sweep, for its run folders) writes; temporary siblings included, so that a
# crash at any moment leaves only owned names behind.
OWNED = (
    MANIFEST,
    f".{MANIFEST}.*",
    "results.json",
    ".results.json.*",
    "README.md",  # the model card
    ".README.md.*",
    "model",
    ".partial-model",
    ".deleting-model",
    "checkpoints",
    "prefix_cache",
    "config.yaml",  # written by `progtuning sweep` beside each run
    "train.log",  # likewise
)
_VALUABLE = ("results.json", "model")  # with a complete checkpoint: what a failed run must never take away


def is_owned(name: str, patterns: tuple[str, ...] | list[str] = OWNED) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def read_manifest(folder: Path) -> list[str] | None:
    """The owned patterns recorded in ``folder``'s manifest, or None if it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("owned"), list):
        return None
    return [str(p) for p in data["owned"]]


def foreign_entries(folder: Path) -> list[str] | None:
    """Entries of ``folder`` progtuning did not write (sorted), or None if the folder has no manifest."""
    owned = read_manifest(folder)
    if owned is None:
        return None
    return sorted(name for name in os.listdir(folder) if not is_owned(name, owned))


# ---------------------------------------------------------------------------------------------
# before anything loads


def check_output_dir(output_dir: str | Path, overwrite: bool = False, resume: bool = False,
                     contents: bool = True) -> None:
    """One line, and nothing written, for an output folder this run cannot use.

    ``contents=False`` skips what depends on the folder's entries: with several processes only the
    first one judges them (it may already have written its manifest when another one looks).
    """
    path = Path(output_dir).expanduser()
    shown = str(output_dir)
    if path.exists() and not path.is_dir():
        raise ProgtuningError(f"output_dir {shown} is a file: choose a folder")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ProgtuningError(f"output_dir {shown} lies under {existing}, a broken link: choose another folder")
        existing = existing.parent
    if not existing.is_dir():
        raise ProgtuningError(f"output_dir {shown} lies under {existing}, which is a file: choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ProgtuningError(f"output_dir {shown} cannot be written ({existing} is read-only for this user): "
                              "choose another --output-dir or change its permissions")
    if resume or not contents or not path.is_dir():
        return
    entries = os.listdir(path)
    if not entries:
        return
    if not overwrite:
        raise ProgtuningError(
            f"output_dir {shown} exists and is not empty: pass --overwrite to replace a previous run, "
            "--resume to continue it, or choose another --output-dir"
        )
    foreign = foreign_entries(path)
    if foreign is None:
        listed = _some(sorted(entries))
        raise ProgtuningError(
            f"--overwrite refused: {shown} is not a progtuning run folder (no {MANIFEST}; it holds {listed}), and "
            "--overwrite only deletes what progtuning wrote: choose another --output-dir"
        )
    if foreign:
        raise ProgtuningError(
            f"--overwrite refused: {shown} holds {_some(foreign)}, which progtuning did not write, and --overwrite "
            "only deletes a run folder with nothing else in it: move them away or choose another --output-dir"
        )


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# creating and cleaning up


@dataclass
class Claim:
    """What :func:`claim` created, so that :func:`release_if_unused` can take it back."""

    folder: Path
    created_dirs: list[Path] = field(default_factory=list)  # outermost first


def claim(output_dir: str | Path, overwrite: bool = False) -> Claim:
    """Make ``output_dir`` this run's folder: delete the previous run's files (``overwrite``), write the manifest."""
    folder = Path(output_dir).expanduser()
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    created.reverse()
    try:
        if overwrite and folder.is_dir():
            check_output_dir(folder, overwrite=True)  # again, right before deleting: nothing foreign appeared
            for name in sorted(os.listdir(folder)):
                if name != MANIFEST:
                    _remove(folder / name)
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder)
    except OSError as error:
        raise io_error(error, f"cannot prepare output_dir {output_dir}") from None
    return Claim(folder, created)


def write_manifest(folder: Path) -> None:
    data = {"format": FORMAT, "owned": list(OWNED),
            "note": "written by progtuning: `--overwrite` deletes only these names, and only if nothing else is here"}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MANIFEST}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MANIFEST)


def release_if_unused(claimed: Claim) -> bool:
    """After a failure: remove what the run wrote and the folders it created, unless it left something of value.

    Of value: a complete checkpoint, ``results.json`` or ``model/``. Returns whether anything was removed.
    """
    folder = claimed.folder
    if not folder.is_dir() or any((folder / name).exists() for name in _VALUABLE):
        return False
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and any(n.startswith("checkpoint-") for n in os.listdir(checkpoints)):
        return False
    if foreign_entries(folder):
        return False  # something else appeared meanwhile: leave the folder alone
    for name in os.listdir(folder):
        if is_owned(name):
            _remove(folder / name)
    for created in reversed(claimed.created_dirs):
        try:
            created.rmdir()  # only if empty
        except OSError:
            break
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# I/O faults as one line

IO_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file",
             errno.EISDIR: "it is a directory", errno.EIO: "an I/O error", errno.ENAMETOOLONG: "the name is too long",
             errno.EMFILE: "too many open files"}


def is_io_fault(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in IO_FAULTS


def io_error(error: OSError, doing: str, hint: str | None = None) -> ProgtuningError:
    """``error: <doing>: <why> (<file>); <hint>`` for an OSError the user can act on."""
    why = IO_FAULTS.get(error.errno, error.strerror or type(error).__name__)
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    fix = hint or ("free some space, then run again" if error.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "choose another --output-dir or fix its permissions")
    return ProgtuningError(f"{doing}: {why}{where}; {fix}")
