"""deploy/k8s: every overlay renders, every document validates against the Kubernetes API schemas
(offline), and the manifests agree with the code. Each check is also shown to catch a broken
document, so a validator that quietly validates nothing fails here."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from devstack.k8s_manifests import (
    K8S_DIR,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    Doc,
    ManifestError,
    check_manifests,
    collector_problems,
    compose_images,
    dependency_problems,
    image_problems,
    load_dependencies,
    main,
    provided_services,
    render,
    schema_problems,
    settings_problems,
    targeting_problems,
    unknown_setting_names,
    workload_problems,
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} documents"
    return matches[0]


def changed(docs: list[Doc], kind: str, name: str, edit: Callable[[Doc], Any]) -> list[Doc]:
    """A deep copy of ``docs`` with one document edited."""
    docs = copy.deepcopy(docs)
    edit(find(docs, kind, name))
    return docs


def container(doc: Doc, index: int = 0) -> Doc:
    containers: list[Doc] = doc["spec"]["template"]["spec"]["containers"]
    return containers[index]


# -- rendering and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_cascade(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered[overlay]}
    for name in ("orchestrator", "screening-worker", "triton", "otel-collector"):
        assert ("Deployment", name) in kinds
        assert ("ServiceMonitor", name) in kinds
        assert ("PodDisruptionBudget", name) in kinds
    for name in ("orchestrator", "screening-worker"):
        assert ("HorizontalPodAutoscaler", name) in kinds
    assert {("Deployment", "quality"), ("ServiceMonitor", "quality")} <= kinds
    namespaces = {d["metadata"].get("namespace") for d in rendered[overlay]}
    assert namespaces == {"fraud-cascade" if overlay == "prod" else "fraud-cascade-dev"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_against_the_api_schemas(
    overlay: str, rendered: dict[str, list[Doc]]
) -> None:
    assert KUBERNETES_VERSIONS[0] == "1.33.0"
    problems = [p for doc in rendered[overlay] for p in schema_problems(doc)]
    assert problems == []


def test_the_core_schemas_refuse_unknown_fields_and_wrong_types(
    rendered: dict[str, list[Doc]],
) -> None:
    deployment = copy.deepcopy(find(rendered["prod"], "Deployment", "orchestrator"))
    container(deployment)["resource"] = container(deployment).pop("resources")  # a typo
    problems = schema_problems(deployment)
    assert len(problems) == len(KUBERNETES_VERSIONS)
    assert "resource" in problems[0]

    deployment = copy.deepcopy(find(rendered["prod"], "Deployment", "orchestrator"))
    deployment["spec"]["replicas"] = "two"
    assert any("spec.replicas" in p for p in schema_problems(deployment))

    hpa = copy.deepcopy(find(rendered["prod"], "HorizontalPodAutoscaler", "orchestrator"))
    hpa["apiVersion"] = "autoscaling/v2beta2"  # removed in 1.26
    assert any("Couldn't find schema" in p for p in schema_problems(hpa))


def test_the_service_monitor_schema_refuses_what_upstream_would(
    rendered: dict[str, list[Doc]],
) -> None:
    monitor = copy.deepcopy(find(rendered["prod"], "ServiceMonitor", "orchestrator"))
    monitor["spec"]["endpoints"][0]["prot"] = monitor["spec"]["endpoints"][0].pop("port")
    problems = schema_problems(monitor)
    assert any("'prot' was unexpected" in p for p in problems), problems
    monitor = copy.deepcopy(find(rendered["prod"], "ServiceMonitor", "orchestrator"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert any("interval" in p for p in schema_problems(monitor))


def test_a_kind_without_a_schema_is_a_problem_not_a_skip() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert schema_problems(widget) != []


def test_kustomize_errors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(ManifestError, match=r"missing\.yaml"):
        render(tmp_path)


# -- the checks against the code ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_passes_every_check(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    assert check_manifests(overlay, rendered[overlay]) == []


def test_every_deployment_needs_requests_limits_probes_and_spread(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    assert workload_problems(docs) == []

    def drop_memory_limit(d: Doc) -> None:
        del container(d)["resources"]["limits"]["memory"]

    def drop_readiness(d: Doc) -> None:
        del container(d)["readinessProbe"]

    def drop_spread(d: Doc) -> None:
        del d["spec"]["template"]["spec"]["topologySpreadConstraints"]

    def spread_over_others(d: Doc) -> None:
        spread = d["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        spread["labelSelector"]["matchLabels"] = {"app.kubernetes.io/name": "orchestrater"}

    def init_without_requests(d: Doc) -> None:
        del d["spec"]["template"]["spec"]["initContainers"][0]["resources"]["requests"]

    cases = {
        "has no limits for memory": drop_memory_limit,
        "has no readinessProbe": drop_readiness,
        "no topologySpreadConstraints": drop_spread,
        "spread does not select its own pods": spread_over_others,
        "container models has no requests": init_without_requests,
    }
    for message, edit in cases.items():
        problems = workload_problems(changed(docs, "Deployment", "orchestrator", edit))
        assert any(message in p for p in problems), (message, problems)


def test_autoscalers_budgets_services_and_monitors_select_what_exists(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    assert targeting_problems(docs) == []

    def misname_target(d: Doc) -> None:
        d["spec"]["scaleTargetRef"]["name"] = "orchestrater"

    def relabel(d: Doc) -> None:
        d["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "orchestrater"}

    def rename_port(d: Doc) -> None:
        d["spec"]["endpoints"][0]["port"] = "prometheus"

    def target_missing_port(d: Doc) -> None:
        d["spec"]["ports"][0]["targetPort"] = "grpcs"

    cases = [
        ("HorizontalPodAutoscaler", "orchestrator", misname_target, "absent"),
        ("PodDisruptionBudget", "screening-worker", relabel, "selects 0 Deployments"),
        ("ServiceMonitor", "triton", rename_port, "has no port prometheus"),
        ("Service", "orchestrator", target_missing_port, "does not expose"),
    ]
    for kind, name, edit, message in cases:
        problems = targeting_problems(changed(docs, kind, name, edit))
        assert any(message in p for p in problems), (kind, message, problems)
    without_hpa = [
        d
        for d in docs
        if not (d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "orchestrator")
    ]
    assert "Deployment/orchestrator: no HorizontalPodAutoscaler" in targeting_problems(without_hpa)


def test_setting_names_are_walked_through_the_groups() -> None:
    good = ["CASCADE_BUDGET__SLO_MS", "CASCADE_GC_FREEZE", "CASCADE_DECISION_LOG__SPOOL_DIR"]
    assert unknown_setting_names(good) == []
    bad = [
        "CASCADE_BUDGET__SLO_SM",  # misspelt field of a group
        "CASCADE_BUDGT__SLO_MS",  # misspelt group
        "CASCADE_BUDGET",  # a whole group
        "CASCADE_LOG_LEVEL__X",  # below a plain field
        "CASCADE_NOPE",
    ]
    assert unknown_setting_names(bad) == bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_environment_builds_the_settings(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    provided = provided_services(load_dependencies(), overlay)
    assert settings_problems(docs, provided) == []

    def env_map(d: Doc) -> dict[str, str]:
        data: dict[str, str] = d["data"]
        return data

    cases: dict[str, Callable[[Doc], Any]] = {
        "CASCADE_BUDGET__SLO_SM names no setting": lambda d: env_map(d).update(
            CASCADE_BUDGET__SLO_SM="40"
        ),
        "CASCADE_BUDGET__SLO_MS: Input should be greater than 0": lambda d: env_map(d).update(
            CASCADE_BUDGET__SLO_MS="-1"
        ),
        "CASADE_LOG_LEVEL is read by nothing": lambda d: env_map(d).update(
            CASADE_LOG_LEVEL="DEBUG"
        ),
        "CASCADE_REDIS__URL points at redis:6379": lambda d: env_map(d).update(
            CASCADE_REDIS__URL="redis://redis:6379/0"
        ),
        "metrics port 9464 is not CASCADE_METRICS_PORT (9465)": lambda d: env_map(d).update(
            CASCADE_METRICS_PORT="9465"
        ),
        # Jaeger is reachable (in prod through its chart), but spans go through the collector.
        "OTEL_EXPORTER_OTLP_ENDPOINT points at jaeger:4317, not the otel-collector": lambda d: (
            env_map(d).update(OTEL_EXPORTER_OTLP_ENDPOINT="http://jaeger:4317")
        ),
    }
    for message, edit in cases.items():
        problems = settings_problems(changed(docs, "ConfigMap", "cascade-env", edit), provided)
        assert any(message in p for p in problems), (message, problems)


def test_ports_probes_and_mounts_follow_the_settings(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["prod"]
    provided = provided_services(load_dependencies(), "prod")

    def grpc_port(d: Doc) -> None:
        container(d)["ports"][0]["containerPort"] = 50052

    def probe_service(d: Doc) -> None:
        container(d)["readinessProbe"]["grpc"]["service"] = "cascade.v1.Scoring"

    def processes(d: Doc) -> None:
        container(d)["env"].append({"name": "CASCADE_SERVER__PROCESSES", "value": "4"})

    def spool_unmounted(d: Doc) -> None:
        mounts = container(d)["volumeMounts"]
        container(d)["volumeMounts"] = [m for m in mounts if m["name"] != "decision-spool"]

    def worker_tcp_probe(d: Doc) -> None:
        container(d)["readinessProbe"] = {"tcpSocket": {"port": 9464}}

    def inline_key(d: Doc) -> None:
        for item in container(d)["env"]:
            if item["name"] == "CASCADE_PSEUDONYM__KEY_FILE":
                item.update(name="CASCADE_PSEUDONYM__KEY", value="x" * 32)

    def key_outside_the_secret(d: Doc) -> None:
        for item in container(d)["env"]:
            if item["name"] == "CASCADE_PSEUDONYM__KEY_FILE":
                item["value"] = "/tmp/pseudonym.key"

    def no_key(d: Doc) -> None:
        env = container(d)["env"]
        container(d)["env"] = [e for e in env if not e["name"].startswith("CASCADE_PSEUDONYM")]

    cases = [
        ("orchestrator", grpc_port, "grpc port 50052 is not CASCADE_SERVER__PORT (50051)"),
        ("orchestrator", probe_service, "readiness must be grpc.health on 50051"),
        ("orchestrator", processes, "one orchestrator process per pod"),
        ("orchestrator", spool_unmounted, "is not a writable mount"),
        ("screening-worker", worker_tcp_probe, "readiness must be an HTTP GET"),
        ("orchestrator", inline_key, "CASCADE_PSEUDONYM__KEY is set inline"),
        ("orchestrator", key_outside_the_secret, "is not in a mounted Secret"),
        ("orchestrator", no_key, "refuses to start without a key"),
    ]
    for name, edit, message in cases:
        problems = settings_problems(changed(docs, "Deployment", name, edit), provided)
        assert any(message in p for p in problems), (message, problems)


def test_images_are_the_compose_files_and_the_models_dockerfiles(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["prod"]
    compose = compose_images()
    assert (
        find(docs, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]["image"]
        == (compose["triton"])
    )
    assert image_problems(docs) == []

    def app_image(d: Doc) -> None:
        container(d)["image"] = "fraud-casade:0.1.0"

    def untagged(d: Doc) -> None:
        d["spec"]["template"]["spec"]["initContainers"][0]["image"] = "fraud-cascade-models"

    def triton_image(d: Doc) -> None:
        container(d)["image"] = "nvcr.io/nvidia/tritonserver:25.01-py3"

    def triton_port(d: Doc) -> None:
        container(d)["command"] = [
            "--grpc-port=8011" if c == "--grpc-port=8001" else c for c in container(d)["command"]
        ]

    cases = [
        ("orchestrator", app_image, "is not fraud-cascade"),
        ("screening-worker", untagged, "has no fixed tag"),
        ("triton", triton_image, "image is not docker-compose.yml's"),
        ("triton", triton_port, "--grpc-port= is not the grpc container port"),
    ]
    for name, edit, message in cases:
        problems = image_problems(changed(docs, "Deployment", name, edit))
        assert any(message in p for p in problems), (message, problems)


def test_the_models_image_holds_what_the_pods_copy() -> None:
    dockerfile = (K8S_DIR.parent / "Dockerfile.models").read_text()
    copies = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for source, _ in copies:
        assert (K8S_DIR.parents[1] / source).exists(), source
    # Triton serves the registry's champion, under the version and model name it names.
    stage2 = load_registry(DEFAULT_MODEL_DIR).stage2
    assert copies == [
        ["models", "/app/models"],
        ["deploy/triton/model_repository", "/triton"],
        [
            f"models/{stage2.path}",
            f"/triton/{stage2.triton_model}/{stage2.triton_version}/model.onnx",
        ],
    ]


def test_triton_runs_the_compose_files_flags(rendered: dict[str, list[Doc]]) -> None:
    compose = yaml.safe_load((K8S_DIR.parent / "docker-compose.yml").read_text())
    ours = container(find(rendered["prod"], "Deployment", "triton"))["command"]
    differ = ("--trace-config=rate=", "--trace-config=opentelemetry,url=")
    expected = [f for f in compose["services"]["triton"]["command"] if not f.startswith(differ)]
    assert [f for f in ours if not f.startswith(differ) and f in expected] == expected
    assert "--trace-config=rate=100" in ours
    assert (
        "--trace-config=rate=1"
        in container(find(rendered["dev"], "Deployment", "triton"))["command"]
    )


def test_the_collector_exports_to_jaeger(rendered: dict[str, list[Doc]]) -> None:
    for overlay in OVERLAYS:
        provided = provided_services(load_dependencies(), overlay)
        assert collector_problems(rendered[overlay], provided) == []
    # dev runs its own Jaeger; prod relies on the chart's: without either, nothing receives.
    dev_without_jaeger = [d for d in rendered["dev"] if d["metadata"]["name"] != "jaeger"]
    problems = collector_problems(dev_without_jaeger, provided_services(load_dependencies(), "dev"))
    assert problems == ["otel-collector: exports to jaeger:4317, which nothing provides"]


# -- upstream charts ----------------------------------------------------------------------------


def test_upstream_charts_are_named_and_pinned() -> None:
    charts = {c["release"]: c for c in load_dependencies()}
    assert set(charts) == {"nats", "redis", "redis-cluster", "jaeger", "kube-prometheus-stack"}
    assert charts["nats"]["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    for chart in charts.values():
        assert chart["version"].count(".") == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_chart_values_give_the_code_what_it_needs(
    overlay: str, rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    charts = load_dependencies()
    docs = rendered[overlay]
    assert dependency_problems(charts, overlay, docs) == []

    def with_values(release: str, edit: Callable[[Doc], Any]) -> list[Doc]:
        edited = copy.deepcopy(charts)
        chart = next(c for c in edited if c["release"] == release)
        values = yaml.safe_load((K8S_DIR / chart["values"][overlay]).read_text())
        edit(values)
        path = tmp_path / f"{release}-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(values))
        chart["values"][overlay] = str(path)  # absolute: K8S_DIR / path is path
        return edited

    cases: list[tuple[list[Doc], str]] = [
        (
            with_values("nats", lambda v: v["config"]["jetstream"].update(enabled=False)),
            "JetStream must be on",
        ),
        (
            with_values("nats", lambda v: v["config"]["merge"].update(ping_max=5)),
            "ping_max is 5",
        ),
    ]
    unpinned = copy.deepcopy(charts)
    unpinned[0]["version"] = "2.x"
    cases.append((unpinned, "is not pinned"))
    both = copy.deepcopy(charts)
    for chart in both:
        if chart["release"].startswith("redis"):
            chart["values"] = {"dev": "charts/redis.dev.yaml", "prod": "charts/redis.dev.yaml"}
    cases.append((both, "installs ['redis', 'redis-cluster']: one Redis chart"))
    if overlay == "dev":
        cases.append(
            (
                with_values("redis", lambda v: v.update(architecture="replication")),
                "architecture standalone",
            )
        )
    else:
        cases += [
            (
                with_values("nats", lambda v: v["config"]["cluster"].update(replicas=1)),
                "1 servers cannot hold streams of 3 replicas",
            ),
            (
                with_values("redis-cluster", lambda v: v["cluster"].update(nodes=3, replicas=0)),
                "at least 3 masters, each with a replica",
            ),
            (
                with_values("redis-cluster", lambda v: v["redis"].update(configmap='save ""')),
                "needs `cluster-require-full-coverage no`",
            ),
        ]
    for edited, message in cases:
        problems = dependency_problems(edited, overlay, docs)
        assert any(message in p for p in problems), (message, problems)

    # The Redis chart and CASCADE_REDIS__CLUSTER go together.
    flipped = "false" if overlay == "prod" else "true"
    edited_docs = changed(
        docs, "ConfigMap", "cascade-env", lambda d: d["data"].update(CASCADE_REDIS__CLUSTER=flipped)
    )
    problems = dependency_problems(charts, overlay, edited_docs)
    assert any("CASCADE_REDIS__CLUSTER" in p for p in problems), problems


# -- prod sizing and the command ----------------------------------------------------------------


def test_prod_autoscalers_reach_the_capacity_plan(rendered: dict[str, list[Doc]]) -> None:
    """deploy/README.md sizes 50k scores/s at 60% of the 500m request: 0.3 core per pod, at
    0.8 ms (orchestrator) and 0.22 ms (screening) of CPU per answer."""
    docs = rendered["prod"]
    for name, cpu_ms in (("orchestrator", 0.8), ("screening-worker", 0.22)):
        hpa = find(docs, "HorizontalPodAutoscaler", name)
        deployment = find(docs, "Deployment", name)
        request = container(deployment)["resources"]["requests"]["cpu"]
        assert request == "500m"
        utilization = hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
        per_pod = 0.5 * utilization / 100 / (cpu_ms / 1000)
        assert hpa["spec"]["maxReplicas"] >= math.ceil(50_000 / per_pod), name
        assert hpa["spec"]["minReplicas"] >= 3  # one per zone
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        assert (spread["topologyKey"], spread["whenUnsatisfiable"]) == (
            "topology.kubernetes.io/zone",
            "DoNotSchedule",
        )
    env = find(docs, "ConfigMap", "cascade-env")["data"]
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["CASCADE_DECISION_LOG__STREAM_REPLICAS"] == "3"


def test_the_command_checks_every_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == list(OVERLAYS)
    assert all(line.endswith(" 0 problems") for line in out)
    with pytest.raises(SystemExit):
        main(["check", "staging"])
