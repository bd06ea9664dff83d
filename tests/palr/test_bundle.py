import json

import pytest

from palr.bundle import Bundle, BundleError, fingerprint


def test_manifest_roundtrip_verify_and_steps(tmp_path):
    b = Bundle.open_or_create(tmp_path)
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "w.bin").write_bytes(b"\0" * 10)
    b.add_artifact("a", "a.txt", kind="text")
    b.add_artifact("d", "dir", kind="weights", dtype="float32")
    fp = fingerprint({"lr": 1e-3}, b.artifact("a")["sha256"])
    b.record_step("train", fp, 1.5)
    b.save()

    again = Bundle.open(tmp_path)
    assert again.artifact("d")["dtype"] == "float32"
    assert again.manifest.packages["python"]
    again.verify()
    assert again.step_is_current("train", fp, ["a", "d"])
    assert not again.step_is_current("train", fingerprint({"lr": 2e-3}), ["a"])

    (tmp_path / "dir" / "w.bin").write_bytes(b"\1" * 10)
    with pytest.raises(BundleError, match=r"d: w.bin checksum .* != manifest"):
        again.verify(["d"])
    assert not again.step_is_current("train", fp, ["a", "d"])
    (tmp_path / "a.txt").unlink()
    with pytest.raises(BundleError, match="a: .*no such file"):
        again.verify(["a"])


def test_bad_manifests_are_refused(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)
    for not_an_object in ("[]", "null", "3"):  # an AttributeError traceback from every step that opened it
        (tmp_path / "manifest.json").write_text(not_an_object)
        with pytest.raises(BundleError, match="not a manifest"):
            Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99"):
        Bundle.open(tmp_path)
    b = Bundle.open_or_create(tmp_path / "new")
    with pytest.raises(BundleError, match="no artifact 'llm'"):
        b.artifact("llm")


def test_manifest_and_artifacts_are_readable_by_other_users(tmp_path):
    """A server runs as another user than the build (deploy/k8s: uid 10001): mkstemp's 0600 manifest and a
    writer's 0600 weights made it fail with a bare PermissionError."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        b = Bundle.open_or_create(tmp_path)
        (tmp_path / "dir").mkdir(mode=0o700)  # as mkdtemp makes a build's scratch folder
        weights = tmp_path / "dir" / "model.safetensors"
        weights.write_bytes(b"\0" * 10)
        weights.chmod(0o600)  # as safetensors' atomic save leaves it
        b.add_artifact("d", "dir")
        b.save()
    finally:
        os.umask(old)
    for path in (tmp_path / "manifest.json", weights):
        assert stat.S_IMODE(path.stat().st_mode) & 0o444 == 0o444, path
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) & 0o555 == 0o555


def test_an_artifact_that_links_to_the_callers_files_leaves_their_permissions_alone(tmp_path):
    """compile base-model --base-model DIR links the caller's checkpoint into the bundle: making the artifact
    readable used to chmod through the links (their 0600 files became 0644; someone else's failed)."""
    import os
    import stat

    theirs = tmp_path / "checkpoint" / "model.safetensors"
    theirs.parent.mkdir()
    theirs.write_bytes(b"\0" * 10)
    theirs.chmod(0o600)
    b = Bundle.open_or_create(tmp_path / "bundle")
    (tmp_path / "bundle" / "base").mkdir()
    os.symlink(theirs, tmp_path / "bundle" / "base" / "model.safetensors")
    b.add_artifact("base", "base")
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o600
    assert b.artifact("base")["files"]["model.safetensors"]  # still hashed through the link


def test_two_writers_keep_each_others_entries(tmp_path):
    """Two targets built at once on one bundle (a shared volume): each process saved the manifest it had
    opened plus its own entry, so the last save dropped the other's. Now a save merges with the disk."""
    base = Bundle.open_or_create(tmp_path)
    for name in ("kept", "removed", "edited"):
        (tmp_path / f"{name}.txt").write_text(name)
        base.add_artifact(name, f"{name}.txt")
    base.save()
    first, second = Bundle.open(tmp_path), Bundle.open(tmp_path)
    (tmp_path / "cpu.txt").write_text("cpu build")
    first.add_artifact("engine:hf-cpu", "cpu.txt")
    first.record_step("build:hf-cpu", "fp-cpu", 1.0)
    first.remove_artifact("removed")
    first.artifact("edited")["note"] = "changed in place"
    first.save()
    (tmp_path / "gpu.txt").write_text("gpu build")
    second.add_artifact("engine:hf-cuda", "gpu.txt")
    second.record_step("build:hf-cuda", "fp-cuda", 1.0)
    second.save()  # opened before `first` saved
    merged = Bundle.open(tmp_path).manifest
    assert {"engine:hf-cpu", "engine:hf-cuda", "kept", "edited"} == set(merged.artifacts)
    assert merged.artifacts["edited"]["note"] == "changed in place"
    assert set(merged.steps) == {"build:hf-cpu", "build:hf-cuda"}


def test_new_artifacts_go_into_the_manifest_in_one_order_whatever_the_hash_seed(tmp_path):
    """save() over a manifest on disk merged new names in set order: the same build wrote a manifest.json of
    another key order."""
    import os
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from palr.bundle import Bundle\n"
              "root = Path(sys.argv[1]); Bundle.open_or_create(root).save(); b = Bundle.open(root)\n"
              "for name in ('sasrec', 'catalog', 'users', 'trends', 'collab', 'profiles', 'zeta', 'alpha'):\n"
              "    (root / name).write_text(name); b.add_artifact(name, name, kind='text')\n"
              "b.save()\n")
    orders = set()
    for seed in ("1", "2", "3", "4"):
        root = tmp_path / seed
        root.mkdir()
        subprocess.run([sys.executable, "-c", script, str(root)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        orders.add(tuple(json.loads((root / "manifest.json").read_text())["artifacts"]))
    assert len(orders) == 1, orders


@pytest.mark.parametrize("text", ['{"users": []}', '{"users": {"u1": {"items": []}}}', '[]', '{'])
def test_a_users_file_of_another_shape_is_a_bundle_error(tmp_path, text):
    from palr.catalog import Catalog, Item
    from palr.users import load_histories

    path = tmp_path / "users.json"
    path.write_text(text)
    with pytest.raises(BundleError, match="not a users file"):  # a list of users was a bare AttributeError
        load_histories(path, Catalog([Item(id="1", title="One", year="", genres=(), train_count=1)]))


def test_write_atomically_writes_text_bytes_or_a_writer_and_a_failed_write_keeps_the_old_file(tmp_path):
    from palr.bundle import write_atomically

    path = tmp_path / "sub" / "f.json"
    write_atomically(path, "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_atomically(path, lambda f: f.write(b"from a writer"))
    assert path.read_bytes() == b"from a writer"

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"from a writer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary file left to be hashed
    assert path.stat().st_mode & 0o777 == 0o666 & ~_current_umask()  # readable as a plain file is


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_directory_swaps_the_folder_and_a_failed_write_keeps_the_old_one(tmp_path):
    from palr.bundle import write_directory

    path = tmp_path / "model"
    path.mkdir()
    (path / "old.bin").write_text("old")

    def fill(part):
        part.mkdir()
        (part / "new.bin").write_text("new")
        return "done"

    def fail(part):
        part.mkdir()
        (part / "half.bin").write_text("half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        write_directory(path, fail)
    assert [p.name for p in path.iterdir()] == ["old.bin"]
    assert write_directory(path, fill) == "done"
    assert [p.name for p in path.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.part, no .model.old


def test_concurrent_writers_of_one_folder_take_turns(tmp_path):
    """A second writer started while the first was writing deleted the first one's part: the first one's swap then
    failed (FileNotFoundError) or swapped in the second one's half-written folder."""
    import threading

    from palr.bundle import write_directory

    path, first_writing, first_may_finish = tmp_path / "model", threading.Event(), threading.Event()
    calls = []

    def first(part):
        calls.append("first")
        part.mkdir()
        (part / "w.bin").write_text("first")
        first_writing.set()
        assert first_may_finish.wait(10)
        return "first"

    def second(part):
        calls.append("second")
        part.mkdir()
        (part / "w.bin").write_text("second")
        return "second"

    results = {}
    threads = [threading.Thread(target=lambda: results.update(first=write_directory(path, first)))]
    threads[0].start()
    assert first_writing.wait(10)
    threads.append(threading.Thread(target=lambda: results.update(second=write_directory(path, second))))
    threads[1].start()
    threads[1].join(0.5)
    assert calls == ["first"] and threads[1].is_alive()  # waits for the first one's swap
    first_may_finish.set()
    for thread in threads:
        thread.join(10)
    assert results == {"first": "first", "second": "second"} and calls == ["first", "second"]
    assert (path / "w.bin").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_killed_writers_leftovers_are_not_part_of_an_artifact(tmp_path):
    """A write killed by a signal leaves its `.NAME.*.part` (no exception ran its cleanup): file_checksums took it
    into the folder's checksum for good (another name each time, never overwritten)."""
    from palr.bundle import file_checksums

    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / ".train.jsonl.kydq_xqh.part").write_text("{")
    (tmp_path / ".merged.part").mkdir()
    (tmp_path / ".merged.part" / "w.bin").write_text("half")
    (tmp_path / ".model.old").mkdir()  # killed between write_directory's two renames
    (tmp_path / ".model.old" / "w.bin").write_text("old")
    (tmp_path / ".hidden").write_text("kept: not a part file")
    assert set(file_checksums(tmp_path)) == {"train.jsonl", ".hidden"}
