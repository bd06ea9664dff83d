"""Shared fixtures. Real data and real components only: ML-100k from the recbole wheel, real
ONNX Runtime sessions, real gRPC servers on port 0, tiny real transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens-100k in atomic-file format (fetched by `make data`, or here if missing)."""
    from compile.fetch import FetchConfig, fetch_dataset

    return fetch_dataset(FetchConfig(data_dir=DATA_DIR, llm=False))


@pytest.fixture(scope="session")
def ml100k(ml100k_dir):
    from palr.corpus import Corpus

    return Corpus.load(ml100k_dir)


# Fixture modules by area; each is a plain module of pytest fixtures.
pytest_plugins = ["tests.fixtures_llm", "tests.fixtures_serving", "tests.fixtures_retrieval", "tests.fixtures_ranking",
                  "tests.fixtures_builds"]
