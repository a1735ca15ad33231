"""Is a saved file whole? Checks that read only a file's structure (a safetensors header against the
file's length, a torch.save zip's directory and CRCs), never its tensors, and never unpickle anything:
used before resuming a checkpoint and before loading an adapter or a model directory.
`umask_mode` gives a saved file the mode the user's umask would (saved files stay readable to the group).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from the header of a .safetensors file after checking that the file is
    whole: the header parses and the file is exactly as long as the header says. Raises ValueError
    with the reason (empty, truncated, not safetensors); reads only the header, never the tensors."""
    size = Path(path).stat().st_size
    if size == 0:
        raise ValueError("is empty (0 bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ValueError(f"is not a safetensors file ({size} bytes, no valid header)")
        try:
            header = json.loads(f.read(n))
            spans = {k: (v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"is not a safetensors file ({size} bytes, unreadable header)") from None
    end = max((int(offsets[1]) for _, offsets in spans.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"is {size} bytes but its header describes {8 + n + end} (truncated or damaged)")
    return {k: list(shape) for k, (shape, _) in spans.items()}


def torch_file_problem(path: Path) -> str | None:
    """Why a `torch.save` file cannot be read (None if its zip structure and checksums are intact)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "is truncated or not a torch.save file"
    return f"fails its checksum (entry {bad}): the file is damaged" if bad else None


def umask_mode(paths) -> None:
    """Give `paths` the mode a new file (or folder) gets under the user's umask. safetensors writes each
    file as a private temporary file (mode 0600) and renames it into place, and tempfile makes private
    folders, so without this a saved model is unreadable to the user's group where nothing else is."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    for p in paths:
        os.chmod(p, (0o777 if Path(p).is_dir() else 0o666) & ~mask)
