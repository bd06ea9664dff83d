"""LLM inference engines behind one interface (`base.RankingEngine`), built by `factory.build_engine`.

`hf` (in-flight batching, shared-prefix KV reuse), `ortgenai` and `trtllm` are the serving engines;
`config.EngineConfig` holds their limits. The benchmark baselines live in `loadtest/baselines.py`.
"""
