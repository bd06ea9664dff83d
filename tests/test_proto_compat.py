"""recsys.v1 stays wire-compatible: the generated descriptors against the committed snapshot
(protos/recsys/v1/descriptor_snapshot.json, written by protos/snapshot.py). Additions pass; each
kind of break is reported, shown on deliberately broken descriptors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("proto_snapshot", REPO / "protos" / "snapshot.py")
snapshot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(snapshot)

F = descriptor_pb2.FieldDescriptorProto


def test_the_generated_recsys_v1_is_compatible_with_the_committed_snapshot():
    problems = snapshot.breaks(snapshot.load_snapshot(), snapshot.describe(snapshot.current_files()))
    assert not problems, ("recsys.v1 changed incompatibly (a breaking change needs recsys.v2; after an addition run "
                          "`python protos/snapshot.py` and commit the snapshot):\n" + "\n".join(problems))


def test_the_snapshot_covers_every_message_enum_and_rpc():
    contract = snapshot.load_snapshot()
    assert {"recsys.v1.RecommendRequest", "recsys.v1.RecommendResponse", "recsys.v1.RetrieveRequest",
            "recsys.v1.RetrieveResponse", "recsys.v1.Candidate", "recsys.v1.RankedItem"} <= set(contract["messages"])
    assert contract["enums"]["recsys.v1.RankingMode"]["RANKING_MODE_GENERATE"] == 2
    assert contract["services"]["recsys.v1.RetrievalService"]["Retrieve"]["server_streaming"] is True
    assert contract["messages"]["recsys.v1.RecommendRequest"]["1"]["name"] == "user_id"


def files_by_name() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {f.name.rsplit("/", 1)[-1]: f for f in snapshot.current_files()}


def message(files, file_name: str, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for m in files[file_name].message_type if m.name == name)


def field(msg: descriptor_pb2.DescriptorProto, name: str) -> descriptor_pb2.FieldDescriptorProto:
    return next(f for f in msg.field if f.name == name)


def check(files) -> list[str]:
    return snapshot.breaks(snapshot.load_snapshot(), snapshot.describe(files.values()))


def test_additions_are_allowed():
    files = files_by_name()
    request = message(files, "ranking.proto", "RecommendRequest")
    request.field.add(name="locale", number=99, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    files["ranking.proto"].message_type.add(name="NewThing")
    next(e for e in files["ranking.proto"].enum_type if e.name == "RankingMode").value.add(name="RANKING_MODE_X",
                                                                                          number=9)
    service = files["ranking.proto"].service[0]
    service.method.add(name="Explain", input_type=".recsys.v1.RecommendRequest",
                       output_type=".recsys.v1.RecommendResponse")
    assert check(files) == []


BREAKS = {
    "field renumbered": (lambda fs: setattr(field(message(fs, "ranking.proto", "RecommendRequest"), "k"), "number", 42),
                         "field recsys.v1.RecommendRequest.k = 3 renumbered to 42"),
    "field retyped": (lambda fs: setattr(field(message(fs, "ranking.proto", "RecommendRequest"), "k"), "type",
                                         F.TYPE_STRING),
                      "field recsys.v1.RecommendRequest.k = 3 retyped from int32 to string"),
    "field made repeated": (lambda fs: setattr(field(message(fs, "ranking.proto", "RecommendRequest"), "user_id"),
                                               "label", F.LABEL_REPEATED),
                            "field recsys.v1.RecommendRequest.user_id = 1 retyped from string to repeated string"),
    "field renamed": (lambda fs: setattr(field(message(fs, "ranking.proto", "RecommendRequest"), "k"), "name", "top"),
                      "field recsys.v1.RecommendRequest.k = 3 renamed to top"),
    "field removed": (lambda fs: message(fs, "ranking.proto", "RecommendRequest").field.remove(
                          field(message(fs, "ranking.proto", "RecommendRequest"), "exclude")),
                      "field recsys.v1.RecommendRequest.exclude = 6 removed"),
    "message removed": (lambda fs: fs["retrieval.proto"].message_type.remove(message(fs, "retrieval.proto", "Candidate")),
                        "message recsys.v1.Candidate removed"),
    "enum value removed": (lambda fs: fs["ranking.proto"].enum_type[0].value.pop(),
                           "enum value recsys.v1.RankingMode.RANKING_MODE_GENERATE = 2 removed"),
    "enum value renumbered": (lambda fs: setattr(fs["ranking.proto"].enum_type[0].value[1], "number", 7),
                              "enum value recsys.v1.RankingMode.RANKING_MODE_SCORE renumbered from 1 to 7"),
    "rpc removed": (lambda fs: fs["ranking.proto"].service[0].method.pop(),
                    "rpc recsys.v1.RankingService/Recommend removed"),
    "rpc request type changed": (lambda fs: setattr(fs["ranking.proto"].service[0].method[0], "input_type",
                                                    ".recsys.v1.RankedItem"),
                                 "rpc recsys.v1.RankingService/Recommend changed its input from "
                                 "recsys.v1.RecommendRequest to recsys.v1.RankedItem"),
    "rpc streaming changed": (lambda fs: setattr(fs["retrieval.proto"].service[0].method[0], "server_streaming", False),
                              "rpc recsys.v1.RetrievalService/Retrieve changed its server streaming from True to False"),
    "service removed": (lambda fs: fs["retrieval.proto"].service.pop(),
                        "service recsys.v1.RetrievalService removed"),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_each_kind_of_break_is_reported(kind):
    files = files_by_name()
    breaking, expected = BREAKS[kind]
    breaking(files)
    assert expected in check(files)


def test_the_cli_check_exits_1_listing_the_break(tmp_path, capsys):
    broken = tmp_path / "snapshot.json"
    contract = snapshot.load_snapshot()
    contract["messages"]["recsys.v1.RecommendRequest"]["3"]["type"] = "int64"  # the stubs now "retype" k
    broken.write_text(json.dumps(contract))
    assert snapshot.main(["--check", "--snapshot", str(broken)]) == 1
    assert "BREAKING: field recsys.v1.RecommendRequest.k = 3 retyped from int64 to int32" in capsys.readouterr().err
    assert snapshot.main(["--check"]) == 0
