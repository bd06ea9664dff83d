"""The retrieval tier: SASRec on ONNX Runtime behind a server-streaming gRPC `Retrieve`.

    config.py    RetrievalServerConfig (the CLI is generated from it in __main__.py)
    (palr/sasrec_onnx.py: the ONNX Runtime session that packs histories, runs, unpacks top-k)
    batcher.py   how requests reach ORT: micro-batched, or one call per request
    servicer.py  the RPC: validation, history resolution, cold start, streaming in chunks
    server.py    wiring: bundle → servicer → palr.serving.server.GrpcServer
"""
