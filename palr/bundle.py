"""The bundle directory that compile/ writes and the servers read, and its manifest.

    bundle/
      manifest.json   schema version, dataset + split checksums, package versions, and one
                      entry per artifact: path, sha256, and for hardware builds the target,
                      device, compute capability, dtype, tensor-parallel size, library version
      catalog.json  users.json  sasrec.onnx  llm/merged/  engines/<target>/  reports/

Every compile step records a fingerprint of its inputs, so an unchanged step is skipped.
Servers call `Bundle.open(dir).verify([...])` before loading anything.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"  # flock(2) target serialising manifest writers
TRACKED_PACKAGES = ("torch", "transformers", "peft", "onnxruntime", "onnx", "numpy", "grpcio",
                    "onnxruntime-genai", "tensorrt_llm", "tensorrt-llm")


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete, corrupted, or built for other hardware."""


def write_atomically(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """`path` holds `content` whole or keeps what it held (an interrupted step or report leaves no half-written file
    for a later reader): text (UTF-8), bytes, or a function writing to the open binary file, written to a temporary
    file beside it (a name of its own per writer, removed if the write fails), flushed to disk, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: a server running as another user must read it
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


T = TypeVar("T")


def write_directory(path: Path, write: Callable[[Path], T]) -> T:
    """`write(part)` into a folder beside `path` (`.NAME.part`), which then replaces `path`: `path` holds the old
    folder or the whole new one, whatever stops the write (a failed one leaves no part behind); `write`'s result.
    The folder twin of `write_atomically` (a model, a checkpoint, an adapter). The old folder is renamed aside
    (`.NAME.old`) and deleted after the swap, not before: only a stop between two renames leaves `path` empty
    (the old folder then waits at `.NAME.old`), not one during the deletion of a model of many GB. Writers in one
    folder take turns (flock on the parent folder, released by the kernel if a writer is killed; no lock file left
    behind): a second one started meanwhile deleted the first one's part and lost it or the first one's swap."""
    part, old = path.with_name(f".{path.name}.part"), path.with_name(f".{path.name}.old")
    with _exclusive(path.parent):
        _remove(part)  # a killed writer's leftovers (no other writer holds it now)
        try:
            result = write(part)
        except BaseException:
            _remove(part)
            raise
        _remove(old)
        if path.is_symlink() or path.exists():
            path.rename(old)
        part.rename(path)
        _remove(old)
    return result


@contextlib.contextmanager
def _exclusive(folder: Path):
    """An exclusive flock(2) on `folder` itself, held for the block (waiting, with a log line, while another holds
    it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another writer in %s to finish", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    """A file, symlink or folder at `path`, gone (nothing there: nothing to do)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(path: Path, only: Callable[[str], bool] | None = None) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (whose relative path passes `only`, if
    given), keyed by relative path."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    if not path.is_dir():
        raise BundleError(f"{path}: no such file or directory")
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and not _unfinished(p.relative_to(path))}
    return {rel: sha256_file(p) for rel, p in files.items() if only is None or only(rel)}


def _unfinished(relative: Path) -> bool:
    """A write in progress, or left by a killed one (`write_atomically`'s `.NAME.*.part` file, `write_directory`'s
    `.NAME.part` and `.NAME.old` folders, at any depth): never part of what an artifact holds."""
    return any(part.startswith(".") and part.endswith((".part", ".old")) for part in relative.parts)


def combined_checksum(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(files.items()):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable hash of configs, checksums and other JSON-serialisable step inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Manifest:
    schema_version: int = SCHEMA_VERSION
    created_at: str = ""
    updated_at: str = ""
    dataset: dict[str, Any] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{source}: not a manifest (a JSON object), but {type(raw).__name__}; rebuild the bundle")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{source}: schema_version {version!r}, this code reads {SCHEMA_VERSION}; rebuild the bundle")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise BundleError(f"{source}: unknown manifest keys {sorted(unknown)}")
        return cls(**raw)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Bundle:
    def __init__(self, root: str | Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self._as_opened = _entries(manifest)  # what save() compares with to know what this process changed

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> "Bundle":
        """Opens an existing bundle; BundleError when it has no readable manifest."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root}: no {MANIFEST}; build a bundle with `python -m compile all --bundle {root}`")
        return cls(root, Manifest.from_json(path.read_text(), path))

    @classmethod
    def open_or_create(cls, root: str | Path) -> "Bundle":
        root = Path(root)
        if (root / MANIFEST).is_file():
            return cls.open(root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, Manifest(created_at=_now()))

    def save(self) -> None:
        """Writes the manifest atomically (temp file + rename) under an exclusive lock on `.lock`, merged with
        what is on disk: the artifacts and steps this process added, changed or removed since it opened the
        bundle are its own; every other entry is kept as another process saved it meanwhile (two targets
        built at once on a shared volume each kept only their own entry before)."""
        with open(self.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / MANIFEST
            if path.is_file():
                self._merge_into(Manifest.from_json(path.read_text(), path))
            self.manifest.updated_at = _now()
            self.manifest.packages = package_versions()
            write_atomically(path, self.manifest.to_json())
            self._as_opened = _entries(self.manifest)

    def _merge_into(self, on_disk: Manifest) -> None:
        """This manifest := `on_disk` plus this process's own changes (see `save`)."""
        for kind in ("artifacts", "steps"):
            opened, ours, merged = self._as_opened[kind], getattr(self.manifest, kind), dict(getattr(on_disk, kind))
            for name in sorted(set(opened) | set(ours)):  # sorted: new names in one order whatever the hash seed
                if name not in ours:
                    merged.pop(name, None)  # removed here
                elif opened.get(name) != ours[name]:
                    merged[name] = ours[name]  # added or changed here
            setattr(self.manifest, kind, merged)
        if self.manifest.dataset == self._as_opened["dataset"]:
            self.manifest.dataset = on_disk.dataset

    # -- artifacts -----------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / self.artifact(name)["path"]

    def has(self, name: str) -> bool:
        return name in self.manifest.artifacts

    def artifact(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest.artifacts[name]
        except KeyError:
            have = ", ".join(sorted(self.manifest.artifacts)) or "none"
            raise BundleError(f"{self.root}: bundle has no artifact {name!r} (has: {have})") from None

    def add_artifact(self, name: str, rel_path: str | Path, *, files: dict[str, str] | None = None,
                     **meta: Any) -> dict[str, Any]:
        """Records a file or directory under the bundle with its checksums and metadata. `files`: the
        checksums, when the caller took them before moving the files into place (`file_checksums`)."""
        rel = Path(rel_path).as_posix()
        files = file_checksums(self.root / rel) if files is None else files
        _readable(self.root / rel, files)
        entry = {"path": rel, "sha256": combined_checksum(files), "files": files, "created_at": _now(), **meta}
        self.manifest.artifacts[name] = entry
        return entry

    def remove_artifact(self, name: str) -> None:
        """Forgets an artifact (its files stay); `save` removes it from the manifest on disk too."""
        self.manifest.artifacts.pop(name, None)

    def version(self, name: str) -> str:
        """A short version string for an artifact: its checksum prefix."""
        return self.artifact(name)["sha256"][:12]

    def verify(self, names: list[str] | None = None, only: Callable[[str], bool] | None = None) -> None:
        """Re-hashes artifacts (of a directory artifact, only the files whose relative path passes `only`, if
        given); BundleError naming every missing or changed file."""
        problems = []
        for name in names if names is not None else sorted(self.manifest.artifacts):
            entry = self.artifact(name)
            base = self.root / entry["path"]
            keep = only if base.is_dir() else None  # a single-file artifact is checked whole
            try:
                actual = file_checksums(base, keep)
            except BundleError as e:
                problems.append(f"{name}: {e}")
                continue
            expected = {rel: digest for rel, digest in entry.get("files", {}).items() if keep is None or keep(rel)}
            for rel in sorted(set(expected) | set(actual)):
                if rel not in actual:
                    problems.append(f"{name}: {rel} is missing")
                elif rel not in expected:
                    problems.append(f"{name}: {rel} is not in the manifest")
                elif actual[rel] != expected[rel]:
                    problems.append(f"{name}: {rel} checksum {actual[rel][:12]} != manifest {expected[rel][:12]}")
        if problems:
            raise BundleError(f"{self.root}: checksum verification failed:\n  " + "\n  ".join(problems))

    # -- steps ---------------------------------------------------------------------------------

    def step_is_current(self, step: str, step_fingerprint: str, outputs: list[str]) -> bool:
        """True when the step ran with these inputs and its outputs are still intact."""
        record = self.manifest.steps.get(step)
        if not record or record.get("fingerprint") != step_fingerprint:
            return False
        if not all(self.has(name) for name in outputs):
            return False
        try:
            self.verify(outputs)
        except BundleError:
            return False
        return True

    def record_step(self, step: str, step_fingerprint: str, seconds: float, **extra: Any) -> None:
        self.manifest.steps[step] = {"fingerprint": step_fingerprint, "finished_at": _now(),
                                     "seconds": round(seconds, 2), **extra}

    def reports_dir(self) -> Path:
        path = self.root / "reports"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable(path: Path, files: dict[str, str]) -> None:
    """Artifacts readable (and their folders searchable) by whoever the umask lets (some writers leave 0600
    files, e.g. safetensors' atomic save, or 0700 folders, e.g. mkdtemp): a server running as another user
    than the build (deploy/k8s: uid 10001) must open them."""
    allowed = ~_umask()
    targets = [(path, 0o444)] if path.is_file() else [(path / name, 0o444) for name in files]
    if path.is_dir():
        targets += [(folder, 0o555) for folder in (path, *(p for p in path.rglob("*") if p.is_dir()))]
    for target, wanted in targets:
        if target.is_symlink():  # a link to the caller's own files (compile base-model --base-model DIR): theirs
            continue
        wanted &= allowed
        mode = target.stat().st_mode
        if mode & wanted != wanted:
            target.chmod(mode | wanted)


def _entries(manifest: Manifest) -> dict[str, Any]:
    """A deep copy of what `Bundle.save` merges: artifacts, steps and the dataset record."""
    return copy.deepcopy({"artifacts": manifest.artifacts, "steps": manifest.steps, "dataset": manifest.dataset})
