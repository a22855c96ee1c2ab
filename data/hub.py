"""Turn "a local path or a Hugging Face dataset id" into a local file.

Every reader accepts either:

* a local file (``/data/lima/train.jsonl``), or a local folder holding the reader's
  default file name; or
* a hub dataset id, ``owner/name`` (the reader's default file in that dataset) or
  ``owner/name/path/in/repo.jsonl`` (that file), fetched with
  ``huggingface_hub.hf_hub_download(repo_type="dataset")`` into the usual hub cache.

When the hub cannot be reached (no network, or ``HF_HUB_OFFLINE=1`` and the file not
in the cache) the reader raises one :class:`~data.pairs.DataError` with a one-line
message, rather than a page of HTTP tracebacks.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.pairs import DataError

# owner/name[/path/in/repo]: no leading "/" or ".", no spaces. A relative local path
# that does not exist also matches; the error message then covers both readings.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?$")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def resolve(source: str | Path, default_filename: str | None) -> Path:
    """Return a local path for ``source`` (see the module docstring for the forms).

    Args:
        source: a local file or folder, or a hub dataset id (optionally with a file).
        default_filename: the file to use for a folder, or for a bare ``owner/name``;
            None when there is no natural default (the file must then be named).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if default_filename is None:
            raise DataError(f"{path}: is a folder; pass the file itself")
        candidate = path / default_filename
        if not candidate.is_file():
            raise DataError(f"{path}: folder has no {default_filename!r}; pass the file itself")
        return candidate
    text = str(source)
    if not _HUB_ID.match(text):
        raise DataError(f"{text}: no such file, and not a hub dataset id 'owner/name'")
    parts = text.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
    if not filename:
        raise DataError(f"{text}: name the file inside the hub dataset, as 'owner/name/path/to/file'")
    try:
        # Imported here: local files must not need huggingface_hub installed.
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as e:  # the hub raises many types (HTTP, offline, not found, OS)
        first = _one_line(str(e).splitlines()[0] if str(e) else "")
        raise DataError(
            f"{text}: not a local file, and cannot fetch {filename!r} from hub dataset "
            f"{repo_id!r} ({type(e).__name__}: {first}); pass a local path, or check the "
            "network / HF_HUB_OFFLINE"
        ) from None
