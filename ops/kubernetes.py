"""``arborl deploy k8s``: the whole loop as Kubernetes manifests, generated from a configuration.

One run on a cluster is the parts ``arborl up`` starts on one machine, each a workload of its
own, sharing a PostgreSQL store (``store.url``, required: SQLite cannot be shared by pods) and
one ReadWriteMany volume for what travels as files (the learner's checkpoints, which the
gateways and engine servers load; DESIGN section 11):

- gateways: StatefulSet ``arborl-gateway``, Service ``arborl-gateway`` (the URL agents use) and
  the headless ``arborl-gateway-pods`` (each pod's own address); ``arborl serve``.
- engine servers (``engine.kind`` vllm or sglang): StatefulSet and headless Service
  ``arborl-engine``; the server command ``arborl serve --launch`` runs (ops/engine_servers.py).
- rollout workers: StatefulSet ``arborl-rollout``; ``arborl rollout``, one stream of groups per pod
  (``--prefix train-<pod>``), its sandboxes on the pod's own disk, or (``rollout.sandbox: k8s``)
  each sandbox a pod of its own: then the workers' ServiceAccount may make, exec into and delete
  pods (a Role in the sandboxes' namespace, nothing cluster-wide), and a NetworkPolicy lets the
  sandbox pods reach the gateways and DNS, nothing else (agents that need more: edit it).
- the learner: StatefulSet ``arborl-learner`` of one pod (fsdp ranks are its children);
  ``arborl train --resume``, publishing every version to every gateway.
- monitoring: ConfigMaps with a Prometheus scrape configuration (pod discovery) and arborl's alert
  rules, and the Grafana dashboard (label ``grafana_dashboard: "1"``, for Grafana's sidecar).

Why StatefulSets: a gateway's pod name is its address for the learner's publishing (each gateway
is told of every version); a rollout worker's pod name names its stream of groups, so a pod that
restarts resumes its own stream and two never share one; the learner must never run twice.

Secrets (the store URL, the admin token, API keys) go into a Secret and reach the pods as
``ARBORL_*`` variables; the configuration in the ConfigMap holds none. Every pod of arborl's own
image runs as root: the rollout sandboxes lease a uid per sandbox (rollout/sandboxes/uid_pool.py),
which needs the default capabilities (SETUID, SETGID, KILL, CHOWN); a ``bwrap`` sandbox needs
its namespaces, so its worker pods are privileged; with ``k8s`` sandboxes the workers run
nothing themselves and get no extra privilege. A ``docker`` sandbox needs a docker engine,
which a pod does not have: refused.

The manifests are validated offline against Kubernetes' own schemas in the test suite
(kubernetes-validate, strict). Never applied to a cluster here: none runs on this machine.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .config import ENV_DELIMITER, ENV_PREFIX, ArborlConfig, ServerEngineConfig
from .engine_servers import ServerCommand, sglang_command, vllm_command

PART_OF = "arborl"
CONFIG_PATH = "/etc/arborl/config.yaml"
SHARED = "/shared"  # the ReadWriteMany volume: checkpoints and the run folder
SCRATCH = "/scratch"  # a pod's own emptyDir: a rollout worker's sandboxes and logs
GATEWAY_PORT = 8000
ENGINE_PORT = 8100
LEARNER_METRICS_PORT = 8001
ROLLOUT_METRICS_PORT = 8002
SANDBOX_ACCOUNT = "arborl-rollout"  # the rollout workers' ServiceAccount when sandboxes are pods
MONITORING = Path(__file__).resolve().parent / "monitoring"
# Configuration keys that are secrets: they go to the Secret, as the variables load_config reads.
SECRET_KEYS = (("store", "url"), ("gateway", "admin_token"), ("gateway", "api_keys"), ("gateway", "admin_keys"),
               ("engine", "upstream_api_key"), ("rollout", "judge_api_key"))


class DeployError(ValueError):
    """A configuration that cannot be deployed this way (the message says what to change)."""


@dataclass(frozen=True)
class ClusterLayout:
    """How many of each part, on which images, with what resources (the flags of ``arborl deploy k8s``)."""

    image: str = "ghcr.io/arborl/arborl:latest"  # arborl's own image (ops, the scaffold CLIs, the task toolchain)
    engine_image: str = ""  # the engine servers' image; default by kind (below)
    namespace: str = "arborl"
    gateways: int = 1
    engines: int = 1  # engine server pods (engine.kind vllm or sglang)
    workers: int = 1  # rollout worker pods
    engine_gpus: int = 1  # per engine server pod
    gateway_gpus: int = 0  # per gateway pod (an embedded engine on a GPU)
    learner_gpus: int = 0  # the learner pod (fsdp: one per rank)
    worker_cpu: str = "4"  # per rollout worker pod: its sandboxes, agents and their tests
    worker_memory: str = "16Gi"
    storage: str = "100Gi"  # the shared volume
    storage_class: str | None = None
    admin_token: str | None = None  # default: the configuration's, else a new random one

    def __post_init__(self) -> None:
        for name in ("gateways", "engines", "workers"):
            if getattr(self, name) < 1:
                raise DeployError(f"--{name} must be at least 1")
        for name in ("engine_gpus", "gateway_gpus", "learner_gpus"):
            if getattr(self, name) < 0:
                raise DeployError(f"--{name.replace('_', '-')} must be >= 0")


ENGINE_IMAGES = {"vllm": "vllm/vllm-openai:latest", "sglang": "lmsysorg/sglang:latest"}


def manifests(config: ArborlConfig, layout: ClusterLayout) -> dict[str, list[dict[str, Any]]]:
    """Every object of the deployment, by the file it goes in (``namespace``, ``secret``, ...)."""
    _check(config, layout)
    server_engine = isinstance(config.engine, ServerEngineConfig)
    files: dict[str, list[dict[str, Any]]] = {
        "namespace": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": layout.namespace,
                                                                            "labels": _labels("namespace")}}],
        "secret": [_secret(config, layout)],
        "config": [_config_map(config, layout)],
        "storage": [_shared_volume(layout)],
    }
    if server_engine:
        files["engine"] = _engines(config, layout)
    files["gateway"] = _gateways(config, layout)
    if config.rollout.sandbox == "k8s":
        files["sandboxes"] = _sandbox_access(config, layout)
    files["rollout"] = _rollout_workers(config, layout)
    files["learner"] = _learner(config, layout)
    files["monitoring"] = _monitoring(layout)
    return files


def write_manifests(files: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """One YAML file per part, plus a kustomization.yaml (``kubectl apply -k OUT``). The Secret's
    file is 0600: it holds the store's URL and the keys."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in files.items():
        path = out / f"{name}.yaml"
        path.touch(mode=0o600 if name == "secret" else 0o644, exist_ok=True)
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [path.name for path in written]}
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return [*written, out / "kustomization.yaml"]


# -- checks ------------------------------------------------------------------------------------


def _check(config: ArborlConfig, layout: ClusterLayout) -> None:
    if not config.store.url.startswith(("postgresql://", "postgres://")):
        raise DeployError("a cluster shares one PostgreSQL store: set store.url (or --store-url) to "
                          "postgresql://USER:PASSWORD@HOST:PORT/DB; SQLite cannot be shared by pods")
    if config.rollout.sandbox == "docker":
        raise DeployError("rollout.sandbox docker needs a docker engine, which a pod does not have: use local "
                          "bwrap or k8s in the rollout pods")
    engine = config.engine
    if isinstance(engine, ServerEngineConfig) and engine.launch:
        raise DeployError("engine.launch starts the engine servers as children of one gateway; on a cluster they "
                          "are pods of their own: set engine.launch false")
    if config.learner.backend != "torch" and layout.learner_gpus not in (0, config.learner.nproc):
        raise DeployError(f"learner.nproc is {config.learner.nproc} (one GPU per {config.learner.backend} rank): "
                          f"--learner-gpus must be {config.learner.nproc}, or 0 for ranks on the CPU")


# -- the pieces --------------------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": f"arborl-{component}", "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/component": component}


def _meta(name: str, component: str, layout: ClusterLayout, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": layout.namespace, "labels": _labels(component), **extra}


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"


def _secret(config: ArborlConfig, layout: ClusterLayout) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    values: dict[str, str] = {}
    for section, key in SECRET_KEYS:
        value = data.get(section, {}).get(key)
        if value:
            values[_env_name(section, key)] = value if isinstance(value, str) else json.dumps(value)
    token = layout.admin_token or config.gateway.admin_token or secrets.token_urlsafe(32)
    values[_env_name("gateway", "admin_token")] = token
    values["ARBORL_ADMIN_TOKEN"] = token  # what the learner publishes with
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta("arborl-secrets", "config", layout), "stringData": values}


def cluster_config(config: ArborlConfig, layout: ClusterLayout) -> dict[str, Any]:
    """The configuration every pod reads: the given one without its secrets, listening on the
    pod's address, the run folder on the shared volume, the engine servers at their pods."""
    data = config.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        data.get(section, {}).pop(key, None)
    data["run_dir"] = f"{SHARED}/run"
    data["gateway"]["host"] = "0.0.0.0"
    data["gateway"]["port"] = GATEWAY_PORT
    if isinstance(config.engine, ServerEngineConfig):
        data["engine"]["url"] = ",".join(_engine_urls(layout))
        data["engine"]["replicas"] = layout.engines
        data["engine"].pop("devices", None)  # a pod sees the GPUs it was given
    return data


def _config_map(config: ArborlConfig, layout: ClusterLayout) -> dict[str, Any]:
    text = yaml.safe_dump(cluster_config(config, layout), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("arborl-config", "config", layout),
            "data": {"config.yaml": text}}


def _shared_volume(layout: ClusterLayout) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": layout.storage}}}
    if layout.storage_class:
        spec["storageClassName"] = layout.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("arborl-shared", "storage", layout),
            "spec": spec}


def _engine_urls(layout: ClusterLayout) -> list[str]:
    return [f"http://arborl-engine-{i}.arborl-engine.{layout.namespace}.svc:{ENGINE_PORT}"
            for i in range(layout.engines)]


def _gateway_urls(layout: ClusterLayout) -> list[str]:
    return [f"http://arborl-gateway-{i}.arborl-gateway-pods.{layout.namespace}.svc:{GATEWAY_PORT}"
            for i in range(layout.gateways)]


def _service(name: str, component: str, layout: ClusterLayout, port: int, *, headless: bool) -> dict[str, Any]:
    port_name = "http" if component in ("gateway", "engine") else "metrics"
    spec: dict[str, Any] = {"selector": _labels(component), "ports": [{"name": port_name, "port": port,
                                                                        "targetPort": port_name}]}
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": True}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component, layout), "spec": spec}


def _probe(path: str, port: str = "http", *, period_s: int = 10, failures: int = 3, delay_s: int = 0) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "failureThreshold": failures,
            "initialDelaySeconds": delay_s}


def _resources(gpus: int, cpu: str, memory: str) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = gpus
    return {"requests": requests, "limits": limits}


def _arborl_container(name: str, args: list[str], *, port: int, resources: dict[str, Any],
                      layout: ClusterLayout, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "image": layout.image, "command": ["arborl"], "args": args,
        "ports": [{"name": "http" if name == "gateway" else "metrics", "containerPort": port}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "envFrom": [{"secretRef": {"name": "arborl-secrets"}}],
        "volumeMounts": [{"name": "config", "mountPath": str(PurePosixPath(CONFIG_PATH).parent), "readOnly": True},
                         {"name": "shared", "mountPath": SHARED}],
        "resources": resources, **extra,
    }


def _volumes(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "config", "configMap": {"name": "arborl-config"}},
            {"name": "shared", "persistentVolumeClaim": {"claimName": "arborl-shared"}}, *extra]


def _stateful_set(name: str, component: str, layout: ClusterLayout, *, replicas: int, service: str,
                  containers: list[dict[str, Any]], volumes: list[dict[str, Any]], metrics_port: int | None,
                  grace_s: int = 60, parallel: bool = True) -> dict[str, Any]:
    annotations = ({"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                    "prometheus.io/path": "/metrics"} if metrics_port else {})
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(name, component, layout),
        "spec": {
            "replicas": replicas, "serviceName": service, "selector": {"matchLabels": _labels(component)},
            # all pods at once, not one after another: they do not depend on each other's order
            "podManagementPolicy": "Parallel" if parallel else "OrderedReady",
            "template": {
                "metadata": {"labels": _labels(component), "annotations": annotations},
                "spec": {"containers": containers, "volumes": volumes, "terminationGracePeriodSeconds": grace_s},
            },
        },
    }


def _server_command(config: ArborlConfig) -> ServerCommand:
    engine = config.engine
    assert isinstance(engine, ServerEngineConfig)
    build = vllm_command if config.engine.kind == "vllm" else sglang_command
    return build(Path(engine.model), ENGINE_PORT, host="0.0.0.0", max_num_seqs=engine.max_running,
                 dtype=engine.dtype, max_model_len=engine.max_model_len,
                 gpu_memory_fraction=engine.gpu_memory_fraction, extra_args=tuple(engine.extra_args))


def _engines(config: ArborlConfig, layout: ClusterLayout) -> list[dict[str, Any]]:
    kind = config.engine.kind
    command = _server_command(config)
    container = {
        "name": kind, "image": layout.engine_image or ENGINE_IMAGES[kind], "command": ["python3"],
        "args": command.args, "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "env": [{"name": name, "value": value} for name, value in {"HF_HUB_OFFLINE": "1", **command.env}.items()],
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}, {"name": "shm", "mountPath": "/dev/shm"}],
        "resources": _resources(layout.engine_gpus, "4", "32Gi"),
        # a server compiles its model before it answers: minutes
        "startupProbe": _probe(command.ready_path, period_s=10, failures=90),
        "readinessProbe": _probe(command.ready_path),
    }
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": "arborl-shared"}},
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    return [_service("arborl-engine", "engine", layout, ENGINE_PORT, headless=True),
            _stateful_set("arborl-engine", "engine", layout, replicas=layout.engines, service="arborl-engine",
                          containers=[container], volumes=volumes, metrics_port=ENGINE_PORT)]


def _gateways(config: ArborlConfig, layout: ClusterLayout) -> list[dict[str, Any]]:
    args = ["serve", "--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)]
    container = _arborl_container(
        "gateway", args, port=GATEWAY_PORT, layout=layout,
        resources=_resources(layout.gateway_gpus, "2", "16Gi"),
        startupProbe=_probe("/healthz", period_s=10, failures=60), readinessProbe=_probe("/readyz"),
        livenessProbe=_probe("/healthz", period_s=20))
    return [_service("arborl-gateway", "gateway", layout, GATEWAY_PORT, headless=False),
            _service("arborl-gateway-pods", "gateway", layout, GATEWAY_PORT, headless=True),
            _stateful_set("arborl-gateway", "gateway", layout, replicas=layout.gateways,
                          service="arborl-gateway-pods", containers=[container], volumes=_volumes(),
                          metrics_port=GATEWAY_PORT)]


def _scaffold_mixture(config: ArborlConfig) -> str:
    return ",".join(f"{name}:{weight:g}" for name, weight in config.rollout.scaffolds.items())


def _rollout_workers(config: ArborlConfig, layout: ClusterLayout) -> list[dict[str, Any]]:
    up = config.up
    args = ["rollout", "--config", CONFIG_PATH, "--gateway", f"http://arborl-gateway.{layout.namespace}.svc:"
            f"{GATEWAY_PORT}", "--run-dir", f"{SCRATCH}/run", "--dataset", up.dataset, "--split", up.train_split,
            "--scaffold", _scaffold_mixture(config), "--prefix", "train-$(POD_NAME)",
            "--metrics-port", str(ROLLOUT_METRICS_PORT), "--metrics-host", "0.0.0.0"]
    if up.train_difficulty:
        args += ["--difficulty", ",".join(up.train_difficulty)]
    pod_sandboxes = config.rollout.sandbox == "k8s"
    extra: dict[str, Any] = {}
    if not pod_sandboxes:  # sandboxes here: a uid leased per sandbox needs root's capabilities
        extra["securityContext"] = {"runAsUser": 0, **({"privileged": True} if config.rollout.sandbox == "bwrap"
                                                       else {})}  # bubblewrap makes its namespaces
    container = _arborl_container(
        "rollout", args, port=ROLLOUT_METRICS_PORT, layout=layout,
        resources=_resources(0, layout.worker_cpu, layout.worker_memory), **extra)
    container["volumeMounts"].append({"name": "scratch", "mountPath": SCRATCH})
    if pod_sandboxes:  # the owner of its sandbox pods: they are deleted with it (rollout/sandboxes/k8s.py)
        container["env"] += [{"name": "ARBORL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                             {"name": "ARBORL_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}]
    workers = _stateful_set("arborl-rollout", "rollout", layout, replicas=layout.workers, service="arborl-rollout",
                            containers=[container], volumes=_volumes({"name": "scratch", "emptyDir": {}}),
                            metrics_port=ROLLOUT_METRICS_PORT, grace_s=120)
    if pod_sandboxes:
        workers["spec"]["template"]["spec"]["serviceAccountName"] = SANDBOX_ACCOUNT
    return [_service("arborl-rollout", "rollout", layout, ROLLOUT_METRICS_PORT, headless=True), workers]


def _sandbox_access(config: ArborlConfig, layout: ClusterLayout) -> list[dict[str, Any]]:
    """What ``k8s`` sandboxes need: the workers' ServiceAccount, a Role to make, watch, exec into
    and delete pods in the sandboxes' namespace, its binding, and the sandboxes' NetworkPolicy."""
    namespace = config.rollout.k8s.namespace or layout.namespace
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(SANDBOX_ACCOUNT, "rollout", layout)}
    def in_sandbox_namespace(component: str) -> dict[str, Any]:
        return {**_meta("arborl-sandboxes", component, layout), "namespace": namespace}

    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": in_sandbox_namespace("rollout"),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"]},
                      {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": in_sandbox_namespace("rollout"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "arborl-sandboxes"},
               "subjects": [{"kind": "ServiceAccount", "name": SANDBOX_ACCOUNT, "namespace": layout.namespace}]}
    gateways = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": layout.namespace}},
                "podSelector": {"matchLabels": _labels("gateway")}}
    dns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": in_sandbox_namespace("sandbox"),
              "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": PART_OF,
                                                       "app.kubernetes.io/component": "sandbox"}},
                       "policyTypes": ["Ingress", "Egress"], "ingress": [],
                       "egress": [{"to": [gateways], "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]},
                                  {"to": [dns], "ports": [{"protocol": "UDP", "port": 53},
                                                          {"protocol": "TCP", "port": 53}]}]}}
    return [account, role, binding, policy]


def _learner(config: ArborlConfig, layout: ClusterLayout) -> list[dict[str, Any]]:
    args = ["train", "--config", CONFIG_PATH, "--run-dir", f"{SHARED}/run",
            "--gateway", ",".join(_gateway_urls(layout)), "--resume",
            "--metrics-port", str(LEARNER_METRICS_PORT), "--metrics-host", "0.0.0.0"]
    if layout.learner_gpus:
        args += ["--device", "cuda"]
    container = _arborl_container("learner", args, port=LEARNER_METRICS_PORT, layout=layout,
                                  resources=_resources(layout.learner_gpus, "4", "64Gi"))
    container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})  # the fsdp ranks' collectives
    return [_service("arborl-learner", "learner", layout, LEARNER_METRICS_PORT, headless=True),
            _stateful_set("arborl-learner", "learner", layout, replicas=1, service="arborl-learner",
                          containers=[container],
                          volumes=_volumes({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}),
                          metrics_port=LEARNER_METRICS_PORT, grace_s=300, parallel=False)]


def prometheus_config(layout: ClusterLayout) -> dict[str, Any]:
    """Scrape every arborl pod that says where its metrics are (the prometheus.io annotations)."""
    relabel = [
        {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"], "regex": PART_OF,
         "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "regex": "true",
         "action": "keep"},
        {"source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
         "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"], "regex": "(.+)",
         "target_label": "__metrics_path__"},
        # the job names of ops/monitoring/prometheus.yml, so the alert rules and the dashboard apply
        {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "regex": "(.+)",
         "replacement": "arborl-$1", "target_label": "job"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    return {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"}, "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "arborl", "kubernetes_sd_configs": [
                {"role": "pod", "namespaces": {"names": [layout.namespace]}}], "relabel_configs": relabel}]}


def _monitoring(layout: ClusterLayout) -> list[dict[str, Any]]:
    prometheus = {"prometheus.yml": yaml.safe_dump(prometheus_config(layout), sort_keys=False),
                  "alerts.yml": (MONITORING / "alerts.yml").read_text()}
    dashboard = {"arborl.json": (MONITORING / "grafana-dashboard.json").read_text()}
    grafana_meta = _meta("arborl-grafana-dashboard", "monitoring", layout)
    grafana_meta["labels"]["grafana_dashboard"] = "1"
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("arborl-prometheus", "monitoring", layout),
             "data": prometheus},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": grafana_meta, "data": dashboard}]


def all_objects(files: dict[str, list[dict[str, Any]]]) -> Iterable[dict[str, Any]]:
    for objects in files.values():
        yield from objects
