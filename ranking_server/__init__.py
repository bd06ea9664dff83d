"""Ranking tier: the PALR LLM ranker behind gRPC; `engines/` holds the LLM inference backends."""
