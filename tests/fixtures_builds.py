"""Deployment-build fixtures: real `compile build` runs on the tiny LLM bundle (tiny preset)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def build_config(bundle: Path, target: str, **options):
    """`compile build` options exactly as `--preset tiny` gives them, plus `options`."""
    from compile.build import BuildConfig
    from compile.presets import preset_for

    return BuildConfig(bundle=bundle, target=target, **(preset_for("tiny", "build") | options))


def copy_bundle(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def hf_cpu_bundle(tiny_llm_bundle, tmp_path_factory) -> Path:
    """The tiny LLM bundle plus a measured `engines/hf-cpu/` build. Read-only: copy it to change it."""
    from compile import build

    bundle = copy_bundle(tiny_llm_bundle, tmp_path_factory.mktemp("hf-cpu-build") / "bundle")
    build.run(build_config(bundle, "hf-cpu"))
    return bundle


@pytest.fixture
def hf_cpu_bundle_copy(hf_cpu_bundle, tmp_path) -> Path:
    """A private copy of `hf_cpu_bundle` a test may edit."""
    return copy_bundle(hf_cpu_bundle, tmp_path / "bundle")
