"""Atomic file writes: write next to the destination under a temporary name, then rename, so a reader
(or an interrupted run) never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temporary file in the destination's directory; it then replaces `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def emit_json(result: dict, out: str | os.PathLike | None = None, indent: int | None = None) -> None:
    """A benchmark's result: printed as one JSON line and, when `out` is given, written there atomically
    (as that line, or indented)."""
    line = json.dumps(result)
    print(line)
    if out:
        write_text_atomic(out, (line if indent is None else json.dumps(result, indent=indent)) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file (contiguous copies of `tensors`, with `metadata`), written atomically."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))
