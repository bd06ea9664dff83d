"""`compile trends`: the trend table is rebuilt when the data it is built from changes, else kept."""

from __future__ import annotations

import logging
import shutil

from compile.trends import TrendsConfig, run
from palr.bundle import Bundle
from palr.data import DatasetFiles
from palr.trends import FILE, TrendTable


def test_the_table_is_kept_while_its_inputs_hold_and_rebuilt_when_the_dataset_changes(tiny_bundle, ml100k_dir,
                                                                                    tmp_path, caplog):
    """The step's fingerprint covers the dataset's checksum: timestamps can change while every user's item order
    (the split's checksum) does not, and the table is built from the timestamps."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = TrendsConfig(bundle=bundle, data=ml100k_dir)
    with caplog.at_level(logging.INFO, logger="compile.trends"):
        run(config)
        assert "trends are current" not in caplog.text
        run(config)
        assert "trends are current" in caplog.text
        before = TrendTable.load(bundle / FILE)
        caplog.clear()
        # the same interactions in the same order, the timestamps an hour later: the split's checksum holds, the
        # dataset's changes (and `compile sasrec`, which retrains on it, records that in the manifest)
        later = tmp_path / "data"
        later.mkdir()
        for f in ml100k_dir.glob("ml-100k.*"):
            shutil.copy(f, later / f.name)
        lines = (ml100k_dir / "ml-100k.inter").read_text().splitlines()
        t = lines[0].split("\t").index("timestamp:float")
        shifted = [lines[0]] + ["\t".join(str(float(v) + 3600) if i == t else v for i, v in enumerate(line.split("\t")))
                                for line in lines[1:] if line]
        (later / "ml-100k.inter").write_text("\n".join(shifted) + "\n")
        opened = Bundle.open(bundle)
        opened.manifest.dataset["checksum"] = DatasetFiles.locate(later).checksum()
        opened.save()
        run(TrendsConfig(bundle=bundle, data=later))
        assert "trends are current" not in caplog.text and "trends: " in caplog.text
        assert TrendTable.load(bundle / FILE).latest == before.latest + 3600
