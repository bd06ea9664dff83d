"""PALR domain code shared by compile/, the servers and loadtest/ (the bottom layer, with protos/).

    data, corpus, catalog, users      RecBole atomic files → interactions, split, items, stored histories
    prompt, decoding, ranking         the PALR prompt, constrained decoding, fusion and MODES
    metrics, profiles, bundle         HR/NDCG/MRR, profile keywords, the bundle and its manifest
    llm                               the one-at-a-time LLM reference the engines reproduce
    sasrec, sasrec_onnx               the torch SASRec model, and the one sasrec.onnx runner
    targets, machine, builds          build targets, what this machine is, the build check
    hf_build, ortgenai_runtime, trtllm_runtime, errors
                                      build-record format and engine-library helpers both sides need
    cli                               dataclass → argparse, the one preset merge, config_main (every entry point)
    serving/                          gRPC plumbing of the servers (the domain modules never import it)

Importing `palr` itself is light; torch and onnxruntime come in only with the modules that need them.
"""
