"""The deployment files stay in step with the code (no Docker engine or cluster here: see
deploy/README.md for what was validated how): every Kubernetes manifest parses, every container's
arguments are accepted by the real server's command line, probes hit the health port the server is
told to open, the ranking server dials the headless retrieval Service with round_robin, and the
Dockerfiles copy what exists and run our modules."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import yaml

from palr.cli import add_config_arguments, add_log_level, build_config
from ranking_server.config import RankingServerConfig
from ranking_server.engines.loop import CLOSE_TIMEOUT_S
from retrieval_server.config import RetrievalServerConfig


REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
SERVERS = {"retrieval_server": RetrievalServerConfig, "ranking_server": RankingServerConfig}


OVERLAYS = ("cpu", "trtllm")  # kubectl apply -k deploy/k8s/<overlay>: base/ plus that ranking Deployment


def documents() -> list[dict]:
    """Every resource in deploy/k8s (both overlays' ranking Deployments among them), kustomizations left out."""
    return [doc for path in sorted(K8S.rglob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def overlay_documents(overlay: str) -> list[dict]:
    """What `kubectl apply -k deploy/k8s/<overlay>` applies: its resources, a folder's expanded (kustomize)."""
    def expand(folder: Path) -> list[dict]:
        docs = []
        for name in yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]:
            path = (folder / name).resolve()
            docs += expand(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        return docs
    return expand(K8S / overlay)


def deployments() -> list[tuple[dict, dict]]:
    """(deployment, its container) for every Deployment in deploy/k8s."""
    return [(doc, doc["spec"]["template"]["spec"]["containers"][0]) for doc in documents()
            if doc["kind"] == "Deployment"]


def server_args(container: dict) -> argparse.Namespace:
    """The container's arguments through the server's own command line (unknown flags fail)."""
    module, *args = container["args"]
    parser = argparse.ArgumentParser(prog=module, exit_on_error=False)
    add_config_arguments(parser, SERVERS[module])
    add_log_level(parser)
    return parser.parse_args(args)


def validated_config(container: dict, root: Path):
    """The server's config from the container's arguments, with its own checks (TLS pairs, ranges, engine
    limits), the secret files it names made under `root` (they are mounted in the pod)."""
    args = vars(server_args(container))
    for name, value in args.items():
        if isinstance(value, (str, Path)) and str(value).startswith("/tls/"):
            path = root / str(value).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("PEM")
            args[name] = str(path)
    return build_config(SERVERS[container["args"][0]], args)


def test_every_manifest_parses_and_each_overlay_is_the_base_plus_its_own_ranking_deployment():
    """One kustomization per hardware: the CPU one was the only one, and re-applying it after swapping in the GPU
    Deployment by hand quietly put the tier back on CPU."""
    assert not (K8S / "kustomization.yaml").exists()  # `apply -k deploy/k8s` fails instead of picking one
    assert sorted(doc["kind"] for doc in documents()).count("Deployment") == 3  # retrieval + ranking ×2
    for overlay in OVERLAYS:
        docs = overlay_documents(overlay)
        deployments_ = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        assert set(deployments_) == {"retrieval", "ranking"}, overlay
        image = deployments_["ranking"]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert ("trtllm" in image) == (overlay == "trtllm"), image
        services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
        assert set(services) == {"retrieval-headless", "ranking", "ranking-headless"}
        assert services["ranking-headless"]["clusterIP"] == "None"
        assert services["ranking-headless"]["selector"] == services["ranking"]["selector"]
        pod_labels = deployments_["ranking"]["spec"]["template"]["metadata"]["labels"]
        assert services["ranking"]["selector"].items() <= pod_labels.items(), overlay
        retrieval_labels = deployments_["retrieval"]["spec"]["template"]["metadata"]["labels"]
        assert services["retrieval-headless"]["selector"].items() <= retrieval_labels.items()
        assert {d["kind"] for d in docs} >= {"Namespace", "PersistentVolumeClaim"}


@pytest.mark.parametrize("name", ["retrieval", "ranking", "ranking (trtllm)"])
def test_container_arguments_are_accepted_by_the_server_and_probes_use_its_health_port(name, tmp_path):
    found = [(d, c) for d, c in deployments()
             if d["metadata"]["name"] == name.split()[0] and ("trtllm" in c["image"]) == name.endswith("(trtllm)")]
    assert len(found) == 1
    deployment, container = found[0]
    args = server_args(container)
    validated_config(container, tmp_path)  # the server's own checks pass (argparse alone took --max-queue 0)
    assert args.host == "0.0.0.0" and args.health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.health_port  # native grpc probes, plaintext health port
    # health answers on the requests' event loop: the default 1 s timeout restarted busy pods
    assert container["livenessProbe"].get("timeoutSeconds", 1) >= 5
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == args.port and ports["health"] == args.health_port
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        path = str(getattr(args, flag))
        assert any(path.startswith(mounts[s] + "/") for s in secrets), f"--{flag} {path} is not on a secret volume"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # NOT_SERVING for a readiness period while still answering, then the drain: all before the kubelet's SIGKILL
    assert float(args.drain_delay) >= container["readinessProbe"]["periodSeconds"]
    # ... and the ranking server's engine close after the drain (it waits up to CLOSE_TIMEOUT_S for a running step)
    engine_close_s = CLOSE_TIMEOUT_S if deployment["metadata"]["name"] == "ranking" else 0.0
    assert grace > float(args.drain_delay) + float(args.grace) + engine_close_s


def test_the_containers_user_can_read_its_tls_secrets_and_the_bundle_claim_can_be_filled():
    """Secret files are owned by root: the non-root user reads them through the pod's fsGroup and a group-readable
    mode (0400 left them unreadable: every pod would exit "cannot serve: Permission denied"). The bundle claim is
    written once by a Job, so it cannot be ReadOnlyMany; the serving pods mount it read-only."""
    for deployment, container in deployments():
        pod = deployment["spec"]["template"]["spec"]
        user = pod["securityContext"]["runAsUser"]
        assert user != 0 and pod["securityContext"].get("fsGroup") is not None, deployment["metadata"]["name"]
        for volume in (v for v in pod["volumes"] if "secret" in v):
            assert volume["secret"]["defaultMode"] & 0o040, volume  # group-readable (yaml reads 0440 as octal)
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims and all(v["persistentVolumeClaim"]["readOnly"] for v in claims)
    claim = next(doc for doc in documents() if doc["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_the_gpu_image_installs_what_the_ranking_server_imports_beyond_the_ngc_base():
    """The TensorRT-LLM image installs our package with --no-deps and lists the rest by hand; OpenTelemetry was
    missing, and `python -m ranking_server` died on import (only --help worked). The NGC image brings torch,
    transformers and safetensors; onnxruntime is the retrieval tier's."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0] for r in needed} - {"torch", "transformers", "safetensors",
                                                                            "onnxruntime"}
    text = (DOCKER / "Dockerfile.trtllm").read_text()
    installed = set(re.findall(r'"([A-Za-z0-9_.-]+)[<>=]', text))
    assert names <= installed, names - installed


def test_ranking_dials_the_headless_retrieval_service_with_round_robin_and_mutual_tls():
    services = {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == "Service"}
    headless = services["retrieval-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    retrieval = server_args(next(c for d, c in deployments() if d["metadata"]["name"] == "retrieval"))
    assert headless["spec"]["ports"][0]["port"] == retrieval.port
    namespace = headless["metadata"]["namespace"]
    for deployment, container in deployments():
        if deployment["metadata"]["name"] != "ranking":
            continue
        args = server_args(container)
        assert args.retrieval == f"dns:///retrieval-headless.{namespace}.svc.cluster.local:{retrieval.port}"
        assert args.retrieval_lb == "round_robin"
        assert args.retrieval_tls_ca and args.retrieval_tls_cert and args.retrieval_tls_key


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.trtllm"])
def test_dockerfiles_copy_what_exists_and_run_our_modules(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and all((REPO / src).exists() for src in sources), sources
    assert re.search(r'^ENTRYPOINT \["python3?", "-m"\]$', text, re.M)
    modules = [json.loads(cmd)[0] for cmd in re.findall(r"^CMD (\[.+\])$", text, re.M)]  # after `python -m`
    assert modules and all((REPO / module / "__main__.py").is_file() for module in modules), modules
    assert re.search(r"^USER 10001$", text, re.M)  # not root
    if dockerfile == "Dockerfile.cpu":
        assert "download.pytorch.org/whl/cpu" in text.split(".[serve")[0]  # the CPU torch pin comes first
    else:
        assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt-llm/release:", text, re.M)


def test_each_tier_survives_a_node_drain_and_the_gpu_tier_rolls_out_without_a_spare_gpu():
    """No PodDisruptionBudget let a drain evict every retrieval pod at once, nothing spread the replicas over nodes,
    and the GPU Deployment's default rollout (surge one pod first) waited forever for a spare H100."""
    for overlay in OVERLAYS:
        docs = overlay_documents(overlay)
        budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            name, spec = deployment["metadata"]["name"], deployment["spec"]
            labels = spec["template"]["metadata"]["labels"]
            assert budgets[name]["selector"]["matchLabels"].items() <= labels.items(), (overlay, name)
            assert budgets[name]["maxUnavailable"] == 1, (overlay, name)
            if spec["replicas"] > 1:
                spread = spec["template"]["spec"]["topologySpreadConstraints"]
                assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname"], (overlay, name)
                assert spread[0]["labelSelector"]["matchLabels"].items() <= labels.items()
            gpus = spec["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get(
                "nvidia.com/gpu")
            if gpus:
                assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}, (overlay, name)
