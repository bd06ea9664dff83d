from pathlib import Path

import pytest

from palr.data import (AtomicFileError, DatasetFiles, Interaction, leave_one_out, read_atomic,
                       read_interactions, user_sequences)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_atomic_parses_types(tmp_path):
    f = write(tmp_path / "x.item", "item_id:token\ttitle:token_seq\tyear:float\temb:float_seq\n"
                                   "7\tThe Matrix\t1999\t0.5 1.5\n")
    table = read_atomic(f)
    assert table.names == ["item_id", "title", "year", "emb"]
    assert table.rows == [["7", ["The", "Matrix"], 1999.0, [0.5, 1.5]]]


@pytest.mark.parametrize("body, expected", [
    ("user_id:token\titem_id:token\n1\t2\t3\n", r"x\.inter:2: expected 2 tab-separated fields, got 3"),
    ("user_id:token\ttimestamp:float\n1\t5\n2\tsoon\n", r"x\.inter:3: field 'timestamp' is float but holds 'soon'"),
    ("user_id\titem_id:token\n", r"x\.inter:1: header field 'user_id' is not name:type"),
    ("user_id:token\titem_id:blob\n", r"x\.inter:1: header field 'item_id:blob'"),
    ("", r"x\.inter:1: empty header"),
])
def test_bad_files_name_file_and_line(tmp_path, body, expected):
    with pytest.raises(AtomicFileError, match=expected):
        read_atomic(write(tmp_path / "x.inter", body))


def test_missing_field_is_named(tmp_path):
    f = write(tmp_path / "x.inter", "uid:token\titem_id:token\n1\t2\n")
    with pytest.raises(AtomicFileError, match="no field 'user_id'"):
        read_interactions(f)


@pytest.mark.parametrize("timestamp", ["", "nan", "inf"])
def test_an_interaction_without_a_finite_timestamp_is_refused_naming_its_line(tmp_path, timestamp):
    """A nan timestamp compares false both ways, so the user's sort silently stopped being chronological and the
    held-out 'last' item could be any of them."""
    f = write(tmp_path / "x.inter", f"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n\n1\t3\t{timestamp}\n")
    with pytest.raises(AtomicFileError, match=r"x\.inter:4: field 'timestamp' is .*finite timestamp"):
        read_interactions(f)


def test_sequences_are_chronological_with_stable_ties():
    xs = [Interaction("u", "late", 30.0, 0), Interaction("u", "tie-first", 10.0, 1),
          Interaction("v", "only", 5.0, 2), Interaction("u", "tie-second", 10.0, 3),
          Interaction("u", "early", 1.0, 4)]
    assert user_sequences(xs) == {"u": ["early", "tie-first", "tie-second", "late"], "v": ["only"]}


def test_leave_one_out_split():
    split = leave_one_out({"u": ["a", "b", "c", "d"], "short": ["a", "b"]})
    assert split.train == {"u": ["a", "b"]}
    assert (split.valid["u"], split.test["u"]) == ("c", "d")
    assert split.test_history("u") == ["a", "b", "c"]
    assert split.too_short == ["short"]


def test_ml100k_split_has_no_leakage(ml100k):
    split = ml100k.split
    assert len(split.train) == 943 and ml100k.num_interactions == 100_000
    for user, seq in ml100k.sequences.items():
        # train + valid + test is exactly the chronological sequence, nothing dropped or repeated
        assert split.train[user] + [split.valid[user], split.test[user]] == seq
        # the validation and test items are the last two interactions, never in the training prefix
        assert split.test[user] not in split.train[user]
        assert split.valid[user] not in split.train[user]


def test_ml100k_catalog(ml100k):
    catalog = ml100k.catalog
    assert len(catalog) == 1682 and catalog.num_indices == 1683
    usual = catalog.by_id("12")
    assert usual.label == "The Usual Suspects (1995)" and usual.genres == ("Crime", "Thriller")
    assert catalog.index("1") == 1 and catalog.item(1).id == "1"
    # popularity counts only the training split
    train_count = sum(seq.count("50") for seq in ml100k.split.train.values())
    assert catalog.by_id("50").train_count == train_count
    assert catalog.popularity_order()[0] == catalog.index("50")  # Star Wars


def test_a_byte_order_mark_is_not_part_of_the_header_and_latin_1_is_named(tmp_path):
    f = tmp_path / "x.inter"
    f.write_bytes("\ufeffuser_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n".encode())
    assert read_atomic(f).names == ["user_id", "item_id", "timestamp"]  # was "no field 'user_id'"
    f = tmp_path / "x.item"
    f.write_bytes("item_id:token\ttitle:token_seq\n1\tMis\u00e9rables\n".encode("latin-1"))
    with pytest.raises(AtomicFileError, match=r"x\.item: not UTF-8 text"):
        read_atomic(f)


def test_a_dotted_dataset_name_finds_its_item_and_user_files(tmp_path):
    d = tmp_path / "ml.v2"
    d.mkdir()
    for suffix in ("inter", "item", "user"):
        write(d / f"ml.v2.{suffix}", "x:token\n")
    files = DatasetFiles.locate(d)
    assert (files.name, files.item, files.user) == ("ml.v2", d / "ml.v2.item", d / "ml.v2.user")  # item was None


def test_locate_dataset_errors(tmp_path):
    with pytest.raises(AtomicFileError, match="does not exist"):
        DatasetFiles.locate(tmp_path / "nope")
    with pytest.raises(AtomicFileError, match="exactly one .inter"):
        DatasetFiles.locate(tmp_path)


def test_bring_your_own_dataset(tmp_path):
    from palr.corpus import Corpus

    d = tmp_path / "shop"
    d.mkdir()
    write(d / "shop.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                            + "".join(f"u{u}\tsku{i}\t{i}\n" for u in range(3) for i in range(5)))
    write(d / "shop.item", "item_id:token\ttitle:token_seq\tcategories:token_seq\n"
                           "sku1\tRed Shoes\tshoes fashion\n")
    corpus = Corpus.load(d)
    assert corpus.catalog.by_id("sku1").title == "Red Shoes"
    assert corpus.catalog.by_id("sku1").genres == ("shoes", "fashion")
    assert corpus.catalog.by_id("sku3").title == "sku3"  # no metadata: the id stands in
    assert corpus.split.test["u0"] == "sku4"


@pytest.mark.parametrize("rows", ["", "u1\tsku1\t1\nu1\tsku2\t2\nu2\tsku1\t3\n"])
def test_a_dataset_without_a_user_to_split_is_refused_naming_its_file(tmp_path, rows):
    """A header-only .inter, or one whose users all have fewer than 3 interactions, was a ZeroDivisionError in
    SASRec's first epoch."""
    from palr.corpus import Corpus

    d = tmp_path / "shop"
    d.mkdir()
    write(d / "shop.inter", "user_id:token\titem_id:token\ttimestamp:float\n" + rows)
    with pytest.raises(AtomicFileError, match=r"shop\.inter: no user has the 3 interactions"):
        Corpus.load(d)


def test_item_ids_sort_numbers_by_value_in_one_fixed_order_and_odd_digits_as_text():
    """Ids equal as numbers ("7", "07") once tied and took set order (changing with PYTHONHASHSEED, so catalog
    indices could change between runs); "²" is a digit to str.isdigit but not to int()."""
    from palr.catalog import natural_key

    ids = ["10", "07", "a", "7", "\u00b2", "2", "007"]
    expected = ["2", "007", "07", "7", "10", "a", "\u00b2"]
    assert sorted(ids, key=natural_key) == expected
    assert sorted(reversed(ids), key=natural_key) == expected
