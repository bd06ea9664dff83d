"""Shared fixtures. Real data and real components only: ML-100k from the recbole wheel, real
ONNX Runtime sessions, real gRPC servers on port 0, tiny real transformers.

Every fixture lives in tests/fixtures/ (one plain module of pytest fixtures per area), registered here.
The tests mirror the packages: tests/palr/, tests/compile/, tests/retrieval_server/, tests/ranking_server/,
tests/loadtest/, tests/gpu/ (skipped without a GPU). `pytest -m slow` runs the test deselected by default.
"""

from __future__ import annotations

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.llm", "tests.fixtures.serving", "tests.fixtures.retrieval",
                  "tests.fixtures.ranking", "tests.fixtures.builds"]
