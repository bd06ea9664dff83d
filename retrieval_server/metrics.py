"""Prometheus metrics of the retrieval server (registered once per process)."""

from prometheus_client import Counter, Gauge, Histogram, Info

from palr.serving.metrics import LATENCY_BUCKETS, RpcMetrics

RETRIEVE = RpcMetrics("retrieval", "Retrieve")
ORT_BATCH_SIZE = Histogram("retrieval_ort_batch_size", "requests per ONNX Runtime call",
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
ORT_SECONDS = Histogram("retrieval_ort_seconds", "duration of one ONNX Runtime call", buckets=LATENCY_BUCKETS)
COLD_STARTS = Counter("retrieval_cold_starts", "requests answered from popularity (no history)")
BUILD = Info("retrieval_build", "the SASRec this process retrieves with (the bundle's sasrec_onnx version, as answers "
             "name it in model_version)")
TRUNCATED = Counter("retrieval_truncated_histories", "requests whose history was longer than the model's max_len")
MODEL_WAITING = Gauge("retrieval_model_waiting", "requests waiting for the model or in its call now (queue depth; "
                      "at --max-queue more are refused RESOURCE_EXHAUSTED)")
