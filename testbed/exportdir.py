"""Write a generated tree of files into a directory all at once (``testbed export``).

Why a module: an export must leave either the old directory or the complete new one, never a
half-written mix, and ``--overwrite`` must never empty a directory the testbed did not
write (``-o ~ --overwrite`` would otherwise delete a home directory). So: every file is written into
a fresh sibling directory first, which then takes the target's place by renames; a target
that exists may be replaced only when it is empty or carries :data:`MARKER`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from runner.errors import UserError

MARKER = ".testbed-export"


def check_target(out: Path, force: bool) -> None:
    """UserError (one line) unless ``out`` may receive the export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file; name a directory (it is created if missing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"-o {out}: {parent} is a file, not a directory")
            break
    if out.is_dir():
        entries = [p.name for p in out.iterdir()]
        if entries and not force:
            raise UserError(f"-o {out} is not empty; pass --overwrite to replace an earlier "
                            "export, or choose an empty directory")
        if entries and MARKER not in entries:
            raise UserError(f"-o {out} holds files that `testbed export` did not write; "
                            "--overwrite replaces only an earlier export: choose another "
                            "directory")


def write_tree(out: Path, files: dict[str, str], private: set[str], force: bool,
               marker: str) -> list[Path]:
    """Write ``files`` (relative path -> text) as directory ``out``; paths in ``private``
    get mode 0600 (they hold credentials). Returns the written paths under ``out``."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, text in {**files, MARKER: marker}.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o600 if rel in private else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        staging.chmod(0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            old.rmdir()
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return [out / rel for rel in files]
