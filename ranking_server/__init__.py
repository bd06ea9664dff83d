"""Ranking tier: the PALR LLM ranker behind gRPC (`python -m ranking_server`).

    config.py            RankingServerConfig (the CLI is generated from it in __main__.py)
    servicer.py          the Recommend RPC: a request ENTERS here and its whole path reads top to bottom
    planner.py           request validation (INVALID_ARGUMENT naming the field) → Plan, the history
                         resolved once (explicit > stored > none) and sent on to the retrieval tier
    prompts.py           PromptBuilder: profile, the PALR prompt as token ids (palr.prompt), the ranking
                         from the engine's answer (palr.ranking)
    retrieval_client.py  the streamed Retrieve call to the retrieval tier, deadline and request id passed on
    engines/             the LLM backends: a request WAITS in an engine's queue, the MODEL RUNS on the
                         engine thread (hf.py: in-flight batching, shared-prefix KV reuse;
                         factory.py: bundle + config → the engine, the one place a backend is chosen;
                         config.py: EngineConfig, the engine limits)
    metrics.py           Prometheus metrics (per request, and the engine's own counters at scrape time)
    server.py            wiring: bundle → planner, prompts, retrieval client, engine → GrpcServer
"""
