"""The checked-in stubs equal what protoc generates from the .proto files (no drift)."""

import filecmp
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_stubs_have_not_drifted(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.relative_to(tmp_path).as_posix() for p in generate.generate(tmp_path)}
    checked_in_root = REPO / "protos" / "gen"
    checked_in = {p.relative_to(checked_in_root).as_posix() for p in checked_in_root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
    assert fresh == checked_in, "run `make protos` and commit protos/gen"
    drifted = [rel for rel in sorted(fresh) if not filecmp.cmp(tmp_path / rel, checked_in_root / rel, shallow=False)]
    assert not drifted, f"stubs differ from protos/*.proto: {drifted}; run `make protos` and commit"


def test_stubs_import_as_a_package():
    from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

    for module, service, method in ((ranking_pb2, "RankingService", "Recommend"),
                                    (retrieval_pb2, "RetrievalService", "Retrieve")):
        assert method in module.DESCRIPTOR.services_by_name[service].methods_by_name
    assert callable(ranking_pb2_grpc.add_RankingServiceServicer_to_server)
    assert callable(retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server)
    req = ranking_pb2.RecommendRequest(user_id="1", k=5, mode=ranking_pb2.RANKING_MODE_GENERATE)
    assert ranking_pb2.RecommendRequest.FromString(req.SerializeToString()) == req
    assert retrieval_pb2.DESCRIPTOR.package == "recsys.v1"
