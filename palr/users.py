"""The bundle's users file (`users.json`: per user the train + valid items as item ids, oldest first: the
history test-time requests are ranked from)."""

from __future__ import annotations

import json
from pathlib import Path

from palr.bundle import BundleError
from palr.catalog import Catalog


def load_histories(path: Path, catalog: Catalog) -> dict[str, list[int]]:
    """users.json → {user_id: item indices, oldest first}."""
    try:
        users = json.loads(Path(path).read_text())["users"]
        histories = {user: catalog.indices(entry["history"]) for user, entry in users.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # AttributeError: "users" is not an object
        raise BundleError(f"{path}: not a users file of this catalog ({type(e).__name__}: {e})") from None
    return histories
