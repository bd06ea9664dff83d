"""PALR domain code shared by compile/ and the servers: data, catalog, prompts, metrics, bundle.

Imports here stay light (no torch): servers import palr without pulling in training code.
"""
