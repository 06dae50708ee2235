"""``arborl deploy k8s``: the manifests validate offline against Kubernetes' own schemas (strict:
an unknown field is an error) for two configurations, and hang together (every reference
resolves, the configuration in the ConfigMap plus the Secret's variables load back as the run's
configuration, the engine pods run the very command ``arborl serve --launch`` runs)."""

from __future__ import annotations

import copy
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from arborl.ops.cli import main
from arborl.ops.config import load_config
from arborl.ops.engine_servers import vllm_command
from arborl.ops.kubernetes import ClusterLayout, DeployError, all_objects, manifests, write_manifests
from arborl.rollout.sandboxes import Limits
from arborl.rollout.sandboxes.k8s_pod import PodSpec

STORE = "postgresql://arborl:pw@db.example:5432/arborl"
VERSIONS = ("1.37.0", "1.30.0")  # the newest schemas the validator ships, and an older cluster's


def one_machine():
    return load_config(None, {"store": {"url": STORE}}), ClusterLayout()


def large(tmp_path: Path):
    config = load_config(None, {
        "store": {"url": STORE},
        "engine": {"kind": "vllm", "model": "/shared/models/Qwen3-8B", "max_running": 64, "dtype": "bfloat16"},
        "gateway": {"api_keys": ["sk-client-key-0123456789"], "admin_token": "admin-token-0123456789"},
        "rollout": {"sandbox": "bwrap", "concurrency": 4, "scaffolds": {"builtin": 3, "opencode": 1}},
        "learner": {"backend": "fsdp", "nproc": 2},
    })
    return config, ClusterLayout(gateways=4, engines=2, workers=8, learner_gpus=2, engine_gpus=1,
                                 storage_class="nfs", namespace="rl")


def pod_sandboxes(tmp_path: Path):
    config = load_config(None, {"store": {"url": STORE}, "rollout": {
        "sandbox": "k8s", "k8s": {"image": "ghcr.io/example/arborl-sandbox:1", "runtime_class": "gvisor"}}})
    return config, ClusterLayout(workers=2)


CASES = {"one machine": lambda tmp: one_machine(), "4 gateways, 2 engines, 8 workers": large,
         "sandboxes as pods": pod_sandboxes}


@pytest.fixture(params=list(CASES))
def deployment(request, tmp_path):
    config, layout = CASES[request.param](tmp_path)
    return config, layout, manifests(config, layout)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(deployment, version):
    _, _, files = deployment
    objects = list(all_objects(files))
    assert len(objects) >= 12
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_what_kubernetes_would():
    _, _, files = (*one_machine(), manifests(*one_machine()))
    gateway = next(obj for obj in files["gateway"] if obj["kind"] == "StatefulSet")
    typo = copy.deepcopy(gateway)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(gateway)
    wrong_type["spec"]["replicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, VERSIONS[0], strict=True)


def _by_kind(files, kind):
    return {obj["metadata"]["name"]: obj for obj in all_objects(files) if obj["kind"] == kind}


def test_every_reference_resolves(deployment):
    _, layout, files = deployment
    services, sets = _by_kind(files, "Service"), _by_kind(files, "StatefulSet")
    config_maps, secrets = _by_kind(files, "ConfigMap"), _by_kind(files, "Secret")
    claims = _by_kind(files, "PersistentVolumeClaim")
    for obj in all_objects(files):
        assert obj["metadata"].get("namespace", layout.namespace) == layout.namespace
    templates = {name: s["spec"]["template"] for name, s in sets.items()}
    for workload in sets.values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert workload["spec"]["serviceName"] in services
        pod = workload["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        names = {volume["name"] for volume in pod["volumes"]}
        for container in pod["containers"]:
            assert {mount["name"] for mount in container["volumeMounts"]} <= names
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert int(annotations["prometheus.io/port"]) in ports.values()  # scraped where it listens
    for name, service in services.items():
        selector = service["spec"]["selector"].items()
        matching = [t for t in templates.values() if selector <= t["metadata"]["labels"].items()]
        assert matching, f"Service {name} selects no pod"
        ports = {p["name"] for t in matching for c in t["spec"]["containers"] for p in c["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports


def test_pod_sandboxes_get_exactly_the_access_they_use_and_a_closed_network(tmp_path):
    config, layout = pod_sandboxes(tmp_path)
    files = manifests(config, layout)
    worker = _by_kind(files, "StatefulSet")["arborl-rollout"]["spec"]["template"]["spec"]
    [account] = _by_kind(files, "ServiceAccount").values()
    assert worker["serviceAccountName"] == account["metadata"]["name"]
    assert "securityContext" not in worker["containers"][0]  # no root, no privilege: it runs no sandbox itself
    [container] = worker["containers"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["ARBORL_POD_NAME"] == "metadata.name" and env["ARBORL_POD_UID"] == "metadata.uid"
    [role], [binding] = _by_kind(files, "Role").values(), _by_kind(files, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": layout.namespace}]
    grants = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert {("pods", "create"), ("pods", "get"), ("pods", "delete"), ("pods/exec", "create")} <= grants
    assert not any(resource in ("secrets", "*") for resource, _ in grants)
    # the policy selects the very pods the sandbox makes, and lets them reach only the gateways and DNS
    [policy] = _by_kind(files, "NetworkPolicy").values()
    pod = PodSpec(pod="arborl-x", sandbox_id="x", namespace=layout.namespace, options=config.rollout.k8s,
                  limits=Limits()).manifest()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["ingress"] == [] and len(policy["spec"]["egress"]) == 2
    assert pod["spec"]["runtimeClassName"] == "gvisor"


def test_the_counts_and_addresses_are_the_layouts(tmp_path):
    config, layout = large(tmp_path)
    files = manifests(config, layout)
    sets = _by_kind(files, "StatefulSet")
    assert {name: s["spec"]["replicas"] for name, s in sets.items()} == {
        "arborl-engine": 2, "arborl-gateway": 4, "arborl-rollout": 8, "arborl-learner": 1}
    learner = sets["arborl-learner"]["spec"]["template"]["spec"]["containers"][0]
    gateways = learner["args"][learner["args"].index("--gateway") + 1].split(",")
    # every gateway, each at its own pod's address (the headless Service), is told of every version
    assert gateways == [f"http://arborl-gateway-{i}.arborl-gateway-pods.rl.svc:8000" for i in range(4)]
    assert learner["resources"]["limits"]["nvidia.com/gpu"] == 2 and "--device" in learner["args"]
    worker = sets["arborl-rollout"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][worker["args"].index("--prefix") + 1] == "train-$(POD_NAME)"  # one stream per pod
    assert worker["args"][worker["args"].index("--scaffold") + 1] == "builtin:3,opencode:1"
    assert worker["securityContext"] == {"runAsUser": 0, "privileged": True}  # bwrap's namespaces
    engine = sets["arborl-engine"]["spec"]["template"]["spec"]["containers"][0]
    same = vllm_command(Path("/shared/models/Qwen3-8B"), 8100, host="0.0.0.0", max_num_seqs=64, dtype="bfloat16")
    assert engine["args"] == same.args  # what `arborl serve --launch` runs
    assert {e["name"]: e["value"] for e in engine["env"]}["VLLM_SERVER_DEV_MODE"] == "1"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _by_kind(files, "PersistentVolumeClaim")["arborl-shared"]["spec"]["storageClassName"] == "nfs"
    local_worker = _by_kind(manifests(*one_machine()), "StatefulSet")["arborl-rollout"]
    assert local_worker["spec"]["template"]["spec"]["containers"][0]["securityContext"] == {"runAsUser": 0}


def test_the_configuration_holds_no_secret_and_loads_back_with_the_secrets_variables(tmp_path):
    config, layout = large(tmp_path)
    files = manifests(config, layout)
    text = _by_kind(files, "ConfigMap")["arborl-config"]["data"]["config.yaml"]
    for secret in (STORE, "sk-client-key-0123456789", "admin-token-0123456789", "pw@"):
        assert secret not in text
    variables = _by_kind(files, "Secret")["arborl-secrets"]["stringData"]
    (tmp_path / "config.yaml").write_text(text)
    loaded = load_config(tmp_path / "config.yaml", environ=variables)
    assert loaded.store.url == STORE
    assert loaded.gateway.admin_token == "admin-token-0123456789" == variables["ARBORL_ADMIN_TOKEN"]
    assert loaded.gateway.api_keys == ["sk-client-key-0123456789"]
    assert (loaded.gateway.host, loaded.gateway.port, str(loaded.run_dir)) == ("0.0.0.0", 8000, "/shared/run")
    assert loaded.engine.kind == "vllm" and not loaded.engine.launch
    assert loaded.engine.urls == [f"http://arborl-engine-{i}.arborl-engine.rl.svc:8100" for i in range(2)]
    assert (loaded.learner.backend, loaded.learner.nproc, loaded.rollout.sandbox) == ("fsdp", 2, "bwrap")
    # without a configured token, one is made (never an empty one)
    made = _by_kind(manifests(*one_machine()), "Secret")["arborl-secrets"]["stringData"]
    assert len(made["ARBORL_GATEWAY__ADMIN_TOKEN"]) >= 32


def test_what_cannot_run_on_a_cluster_is_refused_with_the_fix():
    layout = ClusterLayout()
    with pytest.raises(DeployError, match="PostgreSQL"):
        manifests(load_config(None, {}), layout)
    with pytest.raises(DeployError, match="docker engine"):
        manifests(load_config(None, {"store": {"url": STORE}, "rollout": {"sandbox": "docker",
                                                                          "docker_image": "img"}}), layout)
    with pytest.raises(DeployError, match="engine.launch"):
        manifests(load_config(None, {"store": {"url": STORE}, "engine": {"kind": "vllm", "launch": True}}), layout)
    for backend in ("fsdp", "megatron"):
        with pytest.raises(DeployError, match="learner-gpus must be 2"):
            manifests(load_config(None, {"store": {"url": STORE}, "learner": {"backend": backend, "nproc": 2}}),
                      ClusterLayout(learner_gpus=1))
    with pytest.raises(DeployError, match="at least 1"):
        ClusterLayout(workers=0)


def test_the_command_writes_a_kustomization_and_keeps_the_secret_private(tmp_path, capsys):
    out = tmp_path / "k8s"
    main(["deploy", "k8s", "--out", str(out), "--store-url", STORE, "--gateways", "2", "--workers", "3"])
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in out.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    assert stat.S_IMODE((out / "secret.yaml").stat().st_mode) == 0o600
    objects = [obj for name in kustomization["resources"] for obj in yaml.safe_load_all((out / name).read_text())]
    for obj in objects:
        kubernetes_validate.validate(obj, VERSIONS[0], strict=True)
    assert "StatefulSet/arborl-rollout" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="PostgreSQL"):
        main(["deploy", "k8s", "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()
    write_manifests({"x": []}, tmp_path / "empty")  # an empty part is an empty file, not an error
