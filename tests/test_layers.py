"""The import contracts of pyproject.toml ([tool.importlinter]): layers run one way, loadtest stays
outside the servers, palr's domain modules stay free of gRPC. pytest alone catches a broken layer too."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
