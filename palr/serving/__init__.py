"""gRPC plumbing shared by the retrieval and ranking servers, kept apart from palr's domain modules
(which never import grpc or this package; an import contract checks it). Import the submodules
themselves; this package re-exports nothing:

    config.py    ServerConfig (the options every server shares), message_size_options
    server.py    GrpcServer: lifecycle, health, reflection, TLS credentials, metrics port, SIGTERM drain
    channels.py  open_channel (TLS, mutual TLS, client-side load balancing), LB_POLICIES
    errors.py    RequestError (a status code + a message naming the field), check_known_ids, request_id
    metrics.py   RpcMetrics (per-RPC Prometheus metrics by status code), LATENCY_BUCKETS
"""
