"""deploy/grafana/recsys.json queries only what the servers export: every PromQL expression's metric
names (with prometheus_client's _total/_bucket/_sum/_count suffixes), the labels it groups by and
matches on, and its legend labels are checked against a scrape of both servers (real ones, in
process, on the tiny bundle, after a Recommend, a cold start and a Retrieve)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import free_port
from palr.bundle import Bundle
from ranking_server.config import RankingServerConfig
from ranking_server.server import RankingServer
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.server import RetrievalServer

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "recsys.json"

FUNCTIONS = {"rate", "irate", "increase", "histogram_quantile", "sum", "avg", "min", "max", "count", "topk",
             "clamp_min", "clamp_max", "abs", "delta", "deriv", "avg_over_time", "max_over_time", "label_replace"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
SCRAPE_LABELS = {"instance", "job", "le"}  # added by Prometheus, or every histogram's own
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query, rows' nested panels included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel["title"], target["expr"], target.get("legendFormat", "")))
            walk(panel.get("panels", []))
    walk(dashboard["panels"])
    return found


def parse(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names it matches or groups on, functions it calls) of a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)                    # range selectors [5m], [$__rate_interval]
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(rf"({NAME})\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", "", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)
    functions = set(re.findall(rf"({NAME})\s*\(", text))
    names = {token for token in re.findall(rf"(?<![\w.$:]){NAME}(?![\w:])(?!\s*\()", text)
             if token not in KEYWORDS and not re.fullmatch(r"\d.*", token)}
    return names, labels, functions


def test_the_parser_finds_metrics_labels_and_functions():
    names, labels, functions = parse('histogram_quantile(0.95, sum by (le, stage) '
                                     '(rate(ranking_stage_seconds_bucket{stage!="total"}[$__rate_interval]))) '
                                     '/ on (stage) sum(x_total offset 5m)')
    assert names == {"ranking_stage_seconds_bucket", "x_total"}
    assert labels == {"le", "stage"}
    assert functions == {"histogram_quantile", "sum", "rate"}


def scrape(port: int) -> dict[str, set[str]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


@pytest.fixture(scope="module")
def exported(server_loop, tiny_llm_bundle: Path) -> dict[str, set[str]]:
    """Sample name → its label names, from both servers' /metrics after real traffic."""
    retrieval = server_loop.serve(lambda: RetrievalServer(RetrievalServerConfig(
        bundle=tiny_llm_bundle, port=0, metrics_port=free_port())))
    ranking = server_loop.serve(lambda: RankingServer(RankingServerConfig(
        bundle=tiny_llm_bundle, retrieval=retrieval.server.address, port=0, metrics_port=free_port())))
    try:
        users = json.loads(Bundle.open(tiny_llm_bundle).path("users").read_text())["users"]
        user = next(u for u, e in users.items() if e["history"])
        with grpc.insecure_channel(ranking.server.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=2), timeout=60)
            stub.Recommend(ranking_pb2.RecommendRequest(user_id="nobody", k=2), timeout=60)  # cold start
        with grpc.insecure_channel(retrieval.server.address) as channel:
            list(retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(user_id=user, k=3), timeout=30))
        samples = scrape(ranking.server.metrics_port)
        for name, labels in scrape(retrieval.server.metrics_port).items():
            samples.setdefault(name, set()).update(labels)
        yield samples
    finally:
        server_loop.run(ranking.drain())
        server_loop.run(retrieval.drain())


def test_every_query_uses_metrics_and_labels_the_servers_export(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    problems, used = [], set()
    for title, expr, legend in exprs:
        names, labels, functions = parse(expr)
        used |= names
        problems += [f"{title!r}: {name} is not exported" for name in sorted(names - set(exported))]
        problems += [f"{title!r}: unknown function {f}()" for f in sorted(functions - FUNCTIONS)]
        known = set().union(*(exported.get(n, set()) for n in names)) | SCRAPE_LABELS
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        problems += [f"{title!r}: label {label} is not on {sorted(names)}" for label in sorted((labels | legend_labels)
                                                                                               - known)]
    assert not problems, "\n".join(problems)
    # what operators asked for is all there
    for wanted in ("ranking_stage_seconds_bucket", "ranking_engine_queued", "ranking_engine_active",
                   "ranking_engine_batch_slots_total", "ranking_engine_steps_total", "ranking_engine_tokens_total",
                   "ranking_engine_answer_cache_total", "ranking_retrieval_model_mismatch_total",
                   "ranking_degraded_total", "ranking_rejected_total", "ranking_cold_starts_total",
                   "ranking_requests_total", "ranking_answer_seconds_bucket", "retrieval_request_seconds_bucket",
                   "retrieval_ort_batch_size_sum", "retrieval_ort_batch_size_count", "retrieval_model_waiting"):
        assert wanted in used, f"the dashboard does not show {wanted}"


def test_a_typo_in_a_query_is_caught(exported):
    names, _, _ = parse("sum(rate(ranking_stage_second_bucket[5m]))")
    assert names - set(exported) == {"ranking_stage_second_bucket"}


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
