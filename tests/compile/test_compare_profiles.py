"""compile compare-profiles on the tiny bundle: every (model, method) pair is scored on validation users
only, with the retrieval order's NDCG@10 on the same users next to it."""

from __future__ import annotations

import json
import shutil

import pytest


from compile.compare_profiles import CompareProfilesConfig, run  # noqa: E402
from palr.ranking import FUSION_GRID  # noqa: E402


def test_compares_every_method_for_every_model_on_validation_users(tiny_llm_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, bundle, symlinks=True)
    report = run(CompareProfilesConfig(bundle=bundle, users=4, models=["llm_base", "llm_merged"]))
    assert report["split"] == "validation" and report["users"] == 4
    assert set(report["results"]) == {f"{m}/{p}" for m in ("llm_base", "llm_merged") for p in ("stats", "llm", "none")}
    assert report["examples"]["none"] == ["", "", ""] and all(report["examples"]["stats"])
    for result in report["results"].values():  # (fused >= LLM alone holds by construction: the grid has weight 0)
        assert 0 <= result["llm_ndcg@10"] <= 1 and 0 <= result["fused_ndcg@10"] <= 1
        assert result["fusion_weight"] in FUSION_GRID and result["seconds_per_user"] > 0
    assert json.loads((bundle / "reports" / "compare_profiles.json").read_text()) == report
    with pytest.raises(ValueError, match="--methods"):
        run(CompareProfilesConfig(bundle=bundle, methods=["tfidf"]))


def test_the_bundles_own_method_is_compared_with_the_settings_it_was_built_with(tiny_llm_bundle, tmp_path, monkeypatch):
    """LLM profiles built with --max-items 6 --block-items 3 were compared as the defaults (40 and 20) wrote them:
    not the profiles the merged model was tuned on."""
    import compile.compare_profiles as compare
    from palr.bundle import Bundle
    from palr.profiles import Profiles

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, bundle, symlinks=True)
    settings = {"max_items": 6, "block_items": 3, "keywords": 5, "max_new_tokens": 4}
    Profiles("llm", {}, settings).save(bundle / "profiles.json")
    seen = {}
    import compile.sft_data as sft_data

    def capture(bundle, catalog, config):
        seen[config.method] = config
        return lambda histories, progress: [""] * len(histories)

    monkeypatch.setattr(compare, "profiler", capture)
    monkeypatch.setattr(sft_data, "profiler", capture)  # profile_source's, for the bundle's own method
    opened = Bundle.open(bundle)
    for method in ("llm", "stats"):
        compare.profiles_for(method, opened, None, [[]])
    assert {k: getattr(seen["llm"], k) for k in settings} == settings
    assert seen["stats"].max_items == compare.ProfilesConfig().max_items  # another method: its defaults


@pytest.mark.parametrize("valid", ["", "\n", '{"history": [\n'])
def test_an_empty_or_broken_example_file_is_refused_by_name(tiny_llm_bundle, tmp_path, valid):
    """An empty valid.jsonl was a ZeroDivisionError in the retrieval NDCG; a broken line a bare JSONDecodeError."""
    from palr.bundle import Bundle, BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, bundle, symlinks=True)
    (bundle / "llm" / "sft" / "valid.jsonl").write_text(valid)
    recorded = Bundle.open(bundle)  # as a step that wrote it would have: checksums match, the content is the problem
    entry = recorded.artifact("sft_data")
    recorded.add_artifact("sft_data", entry["path"], **{k: v for k, v in entry.items()
                                                        if k not in ("path", "sha256", "files", "created_at")})
    recorded.save()
    with pytest.raises(BundleError, match="valid.jsonl"):
        run(CompareProfilesConfig(bundle=bundle, users=4, models=["llm_base"]))
