"""``arborl deploy k8s --out DIR``: write Kubernetes manifests for a run (ops/kubernetes.py).

    arborl deploy k8s --out k8s/ --config cluster.yaml --store-url postgresql://arborl:PW@db:5432/arborl \\
        --gateways 4 --engines 2 --workers 8 --learner-gpus 2
    kubectl apply -k k8s/

The configuration file is the one ``arborl up`` reads (its engine, gateway, rollout, learner and
up sections); the flags say how many of each part and on which images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .kubernetes import ClusterLayout, DeployError, all_objects, manifests, write_manifests


def add_deploy_flags(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="deploy_target", required=True)
    k8s = targets.add_parser("k8s", help="Kubernetes manifests (one YAML per part and a kustomization.yaml)")
    k8s.add_argument("--out", type=Path, required=True, help="the folder to write them into")
    k8s.add_argument("--config", help="YAML or TOML configuration file (as for arborl up)")
    k8s.add_argument("--store-url", help="the shared PostgreSQL store (store.url): postgresql://...")
    k8s.add_argument("--namespace", default="arborl")
    k8s.add_argument("--image", default=ClusterLayout.image, help="arborl's image (its CLIs and the task toolchain)")
    k8s.add_argument("--engine-image", default="", help="the engine servers' image (default: the kind's official one)")
    k8s.add_argument("--gateways", type=int, default=1, help="gateway pods")
    k8s.add_argument("--engines", type=int, default=1, help="engine server pods (engine.kind vllm or sglang)")
    k8s.add_argument("--workers", type=int, default=1, help="rollout worker pods")
    k8s.add_argument("--engine-gpus", type=int, default=1, help="GPUs per engine server pod")
    k8s.add_argument("--gateway-gpus", type=int, default=0, help="GPUs per gateway pod (an embedded engine)")
    k8s.add_argument("--learner-gpus", type=int, default=0, help="GPUs of the learner pod (fsdp: learner.nproc)")
    k8s.add_argument("--storage", default="100Gi", help="size of the shared ReadWriteMany volume (checkpoints)")
    k8s.add_argument("--storage-class", help="its storage class (default: the cluster's)")


def deploy_command(args: argparse.Namespace) -> None:
    overrides = {"store": {"url": args.store_url}} if args.store_url else None
    try:
        config = load_config(args.config, overrides)
        layout = ClusterLayout(image=args.image, engine_image=args.engine_image, namespace=args.namespace,
                               gateways=args.gateways, engines=args.engines, workers=args.workers,
                               engine_gpus=args.engine_gpus, gateway_gpus=args.gateway_gpus,
                               learner_gpus=args.learner_gpus, storage=args.storage, storage_class=args.storage_class)
        files = manifests(config, layout)
    except (ConfigError, DeployError) as exc:
        raise SystemExit(f"arborl: {exc}") from None
    written = write_manifests(files, args.out)
    kinds = sorted({f"{obj['kind']}/{obj['metadata']['name']}" for obj in all_objects(files)})
    print(f"wrote {len(written)} files to {args.out} ({len(kinds)} objects); apply with: kubectl apply -k {args.out}",
          file=sys.stderr)
    for kind in kinds:
        print(kind)
