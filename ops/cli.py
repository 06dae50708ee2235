"""The ``arborl`` command line.

    arborl up                      the online RL loop on runs/default: gateway on 127.0.0.1:8000, rollouts, learner
    arborl serve [--model M ...]   the gateway alone, with every engine and gateway setting as a flag
    arborl train --store RUN [--gateway URL] [--resume]   train on RUN's complete groups, publish each version
    arborl trie list [--run DIR]   the sessions recorded in a run
    arborl trie show SESSION       one session's prefix tree (--html FILE for a picture)
    arborl eval --dataset D --scaffold S --k K   run agents on D's tasks in sandboxes; pass@k report
    arborl rollout --dataset D --groups N       groups of rollouts with rewards, for the learner
    arborl ops ACTION              pause/resume training or serving, roll back, promote, set lr, audit log
    arborl connect SCAFFOLD        how to point claude-code, codex, opencode or cline at the gateway
    arborl report RUN              RUN/report.html: reward, pass rates, entropy, mismatch, throughput charts
    arborl store migrate SRC DST   copy a run's store (SQLite file or PostgreSQL) into an empty other, ids kept
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import SERVE_DEFAULTS, UP_DEFAULTS, ArborlConfig, ConfigError, load_config
from .deploy_command import add_deploy_flags, deploy_command
from .ops_command import add_ops_flags, ops_command
from .rollout_commands import add_rollout_flags, eval_command, rollout_command
from .store_command import add_store_flags, store_command

log = logging.getLogger("arborl")


def run_dir_flag(parser: argparse.ArgumentParser, old_spellings: tuple[str, ...] = ("--run",)) -> None:
    """``--run-dir DIR``, the run folder, spelled the same by every command; the spellings some
    commands used before (``--run``, ``--store``) still work, unlisted."""
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="the run folder: store, logs, checkpoints (default runs/default)")
    for spelling in old_spellings:
        parser.add_argument(spelling, dest="run_dir", type=Path, help=argparse.SUPPRESS)


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or TOML configuration file")
    parser.add_argument("--run-dir", help="folder for the store and logs (default runs/default)")
    store_flag(parser)
    parser.add_argument("--model", help="SmolLM2-135M-Instruct (default), tiny-random-llama, or a model folder")
    parser.add_argument("--served-name", help="model name clients use (default: the model's name)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--max-running", type=int, help="sequences decoded together (default 16)")
    parser.add_argument("--max-tokens-cap", type=int, help="cap on every request's max_tokens")
    parser.add_argument("--tool-parser", choices=["hermes", "qwen3_coder", "llama3_json"])
    parser.add_argument("--engine", choices=["embedded", "upstream", "vllm", "sglang"],
                        help="run a model here (default), forward to an upstream, or serve from vLLM or SGLang "
                             "servers")
    parser.add_argument("--engine-url", help="the vLLM or SGLang servers' root URLs, comma-separated (engine.url)")
    parser.add_argument("--replicas", type=int, help="with --launch: engine servers to start (engine.replicas)")
    parser.add_argument("--launch", action="store_const", const=True,
                        help="start the vLLM or SGLang servers here (engine.launch)")
    parser.add_argument("--upstream-url", help="upstream base URL (OpenAI: http://host/v1; Anthropic: https://host)")
    parser.add_argument("--upstream-api", choices=["openai", "anthropic"], help="the upstream's API (default openai)")
    parser.add_argument("--upstream-model", help="model name at the upstream (default: --served-name)")
    parser.add_argument("--upstream-api-key", help="key for the upstream (or ARBORL_ENGINE__UPSTREAM_API_KEY)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        ("run_dir",): args.run_dir,
        ("store", "url"): args.store,
        ("engine", "model"): args.model,
        ("engine", "served_name"): args.served_name,
        ("engine", "device"): args.device,
        ("engine", "max_running"): args.max_running,
        ("engine", "kind"): args.engine,
        ("engine", "upstream_url"): args.upstream_url,
        ("engine", "url"): args.engine_url,
        ("engine", "replicas"): args.replicas,
        ("engine", "launch"): args.launch,
        ("engine", "upstream_api"): args.upstream_api,
        ("engine", "upstream_model"): args.upstream_model,
        ("engine", "upstream_api_key"): args.upstream_api_key,
        ("gateway", "host"): args.host,
        ("gateway", "port"): args.port,
        ("gateway", "max_tokens_cap"): args.max_tokens_cap,
        ("gateway", "tool_parser"): args.tool_parser,
    }
    out: dict[str, Any] = {}
    for path, value in pairs.items():
        if value is None:
            continue
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return out


def serve(config: ArborlConfig) -> None:
    import uvicorn

    from arborl.gateway.app import create_app

    from .http_server import server_config
    from .local_gateway import build_engine, open_run_store, restore_served_version, write_run_info

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    built = build_engine(config, run_dir)
    try:  # servers started for the engine (engine.launch) stop with the gateway, however it ends
        engine = built.engine
        store = open_run_store(config, run_dir)
        write_run_info(run_dir, engine, built.model_dir)
        restore_served_version(engine, store)
        app = create_app(engine, store, config.gateway)
        host, port = config.gateway.host, config.gateway.port
        print(
            f"arborl: serving {engine.model_name!r} on http://{host}:{port}/v1 ({built.where}); "
            f"recording into {store.location}",
            flush=True,
        )
        uvicorn.Server(server_config(app, config.gateway, host=host, port=port, access_log=False)).run()
    finally:
        built.stop()


def _open_store(run_dir: Path, store_url: str = ""):
    """An existing run's store, for the commands that read or train on it."""
    from arborl.rollout.store import STORE_FILE_NAME, open_store

    try:
        if not store_url and not (run_dir / STORE_FILE_NAME).is_file():
            raise SystemExit(f"arborl: no store at {run_dir / STORE_FILE_NAME} (use --run-dir DIR or --store URL)")
        return open_store(store_url, run_dir)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"arborl: {exc}") from None


def _tokenizer(run_dir: Path):
    info = run_dir / "run.json"
    if not info.is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(json.loads(info.read_text())["model_dir"])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def trie_list(run_dir: Path, store_url: str) -> None:
    store = _open_store(run_dir, store_url)
    sessions = store.sessions()
    if not sessions:
        print("no sessions recorded yet")
    for session in sessions:
        refused = f", {session['refused']} refused" if session["refused"] else ""
        print(f"{session['id']}\t{_count(session['calls'], 'call')}{refused}\t"
              f"identified by {session['identified_by'] or '-'}")


def resolve_session(sessions: list[str], given: str) -> str:
    """The stored session ``given`` names: itself, or the one an agent's own id was filed under
    (Claude Code's session ``X`` is stored as ``claude-X``). Exits with the candidates otherwise."""
    if given in sessions:
        return given

    def named(session: str) -> bool:  # the main trie or an auxiliary one (":title", ...) of the agent's session
        base = session.split(":", 1)[0]
        return base == given or base.endswith("-" + given)

    matches = sorted(s for s in sessions if named(s))
    mains = [s for s in matches if ":" not in s]
    if len(mains) == 1 or len(matches) == 1:
        return (mains or matches)[0]
    if matches:
        raise SystemExit(f"arborl: {given!r} could be any of {', '.join(matches)}: name one")
    raise SystemExit(f"arborl: no session {given!r} (`arborl trie list` names them; Claude Code's "
                     "session X is stored as claude-X)")


def trie_show(run_dir: Path, store_url: str, session: str, html: Path | None, show_tokens: int) -> None:
    from .trie_view import render_trie_html, render_trie_text

    store = _open_store(run_dir, store_url)
    session = resolve_session([s["id"] for s in store.sessions()], session)
    tokenizer = _tokenizer(run_dir)
    try:
        if html is not None:
            html.write_text(render_trie_html(store, session, tokenizer=tokenizer))
            print(f"wrote {html}")
        else:
            print(render_trie_text(store, session, tokenizer=tokenizer, show_tokens=show_tokens))
    except KeyError as exc:
        raise SystemExit(f"arborl: {exc.args[0]}") from None


def train(args: argparse.Namespace) -> None:
    """The learner as its own process: complete groups from RUN's store, versions to the gateway."""
    import os

    from arborl.gateway.engines.model_source import resolve_model
    from arborl.learner.loop import Learner, LearnerError
    from arborl.learner.metrics import LearnerMetrics
    from arborl.learner.publish import GatewayPublisher
    from arborl.learner.trainer import RankFailed
    from arborl.rollout.store import RunLedger

    overrides: dict[str, Any] = {"learner": {k: v for k, v in {
        "lr": args.lr, "groups_per_step": args.groups_per_step, "max_staleness": args.max_staleness,
        "mcla_passes": args.mcla_passes, "backend": args.backend, "nproc": args.nproc,
        "tensor_parallel": args.tensor_parallel}.items() if v is not None}}
    store_url, run_dir = _store_and_run_dir(args)
    if store_url:
        overrides["store"] = {"url": store_url}
    config = load_config(args.config, overrides)
    ledger = RunLedger(_open_store(run_dir, config.store.url))
    info = run_dir / "run.json"
    model = args.model or (json.loads(info.read_text()).get("model_dir") if info.is_file() else None)
    start = model or (config.engine.model if config.engine.kind != "upstream" else None)
    if not start:
        raise SystemExit("arborl: an upstream engine has no weights to train: give the starting weights with --model")
    base = resolve_model(start)
    publisher = None
    if args.gateway:
        token = args.admin_token or os.environ.get("ARBORL_ADMIN_TOKEN") or config.gateway.admin_token
        if not token:
            raise SystemExit("arborl: publishing to --gateway needs --admin-token (or ARBORL_ADMIN_TOKEN)")
        publisher = GatewayPublisher([url for url in args.gateway.split(",") if url.strip()], token)
    metrics = LearnerMetrics()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    try:
        teachers = {domain: resolve_model(model) for domain, model in config.learner.teachers.items()}
        learner = Learner(ledger, run_dir, config.learner, base_model=base, publisher=publisher, resume=args.resume,
                          device=args.device, teachers=teachers,
                          metrics=metrics, progress=lambda line: print(line, flush=True))
    except LearnerError as exc:
        raise SystemExit(f"arborl: {exc}") from None
    try:
        learner.run(max_steps=args.max_steps, idle_exit_s=args.idle_exit)
    except KeyboardInterrupt:
        print(f"learner: stopped at step {learner.step}; `arborl train --resume` continues", flush=True)
    except RankFailed as exc:
        raise SystemExit(f"arborl: {exc}") from None
    finally:
        learner.close()


def _store_and_run_dir(args: argparse.Namespace) -> tuple[str, Path]:
    """``--store``: a database URL, or (the older spelling of ``arborl train --store RUN``) a folder."""
    store = args.store or ""
    if store and "://" not in store:
        return "", Path(store)
    return store, args.run_dir


def store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="the run's store: postgresql://user@host:port/db (default: the run "
                        "folder's store.sqlite; or ARBORL_STORE__URL)")


def connect(args: argparse.Namespace) -> None:
    from arborl.scaffold_adapters.base import GatewayTarget
    from arborl.scaffold_adapters.registry import get_adapter

    from .connect import connect_text, new_session_id, served_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # stdout is for the lines to eval, stderr for advice
    try:
        adapter = get_adapter(args.scaffold)
    except KeyError as exc:
        raise SystemExit(f"arborl: {exc.args[0]}") from None
    config = load_config(args.config)
    url = args.url or f"http://{config.gateway.host}:{config.gateway.port}"
    key = args.key or (config.gateway.api_keys[0] if config.gateway.api_keys else "arborl")
    model = args.model or config.engine.served_name or served_model(url, key)
    if model is None:
        # Still print the configuration (`eval "$(arborl connect ...)"` must not silently set
        # nothing and send the agent to its vendor): it points at the configured address, under the
        # name `arborl serve` would serve (which answers any model name anyway).
        model = Path(config.engine.model).name if config.engine.kind != "upstream" else "arborl"
        print(f"arborl: no gateway answers at {url} yet: start one (`arborl up` or `arborl serve`), or give "
              f"its address with --url URL. The configuration below points at {url}.", file=sys.stderr)
    session = args.session or (new_session_id(adapter.name) if adapter.names_its_session is None else None)
    print(connect_text(args.scaffold, GatewayTarget(url, key, model, session), args.write_home))


def _stop_when_the_supervisor_dies() -> None:
    """Under ``arborl up`` (ARBORL_SUPERVISOR_PID set): when the supervisor is gone (killed
    outright, so it could not stop us), stop as on Ctrl-C, so unfinished work is marked and
    sandboxes are closed rather than orphaned."""
    import os
    import signal
    import threading
    import time

    supervisor = os.environ.get("ARBORL_SUPERVISOR_PID")
    if not supervisor:
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(1.0)
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _interruptible() -> None:
    """Ctrl-C and SIGTERM stop every command the same clean way (KeyboardInterrupt), even when
    it was started with SIGINT ignored: a background job of a non-interactive shell inherits
    that, and Python then installs no handler of its own. ``arborl up`` stops its children with
    SIGINT, and service managers stop processes with SIGTERM."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arborl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="the whole loop: gateway, rollout workers and learner (the main job)")
    _serve_flags(up)
    up.add_argument("--dataset", help="the rollout workers' tasks (default builtin)")
    up.add_argument("--heldout-every", type=int, help="a held-out evaluation every N steps (0: never)")
    up.add_argument("--max-seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    up.add_argument("--ray", metavar="ADDRESS", help="place every part on the Ray cluster at ADDRESS (auto: this "
                                                    "node's); up.ray_parts says where each goes")
    up.add_argument("--ray-node-ip", help="this machine's address in the Ray cluster (default: Ray's guess)")
    _serve_flags(commands.add_parser("serve", help="run the gateway with an engine"))
    trie = commands.add_parser("trie", help="inspect recorded prefix trees").add_subparsers(dest="trie_command",
                                                                                               required=True)
    listing = trie.add_parser("list", help="sessions in a run")
    run_dir_flag(listing)
    store_flag(listing)
    show = trie.add_parser("show", help="one session's trie")
    show.add_argument("session", help="a session id (or the agent's own: Claude Code's X is stored as claude-X)")
    run_dir_flag(show)
    store_flag(show)
    show.add_argument("--html", type=Path, help="write an HTML picture of the tree to this file")
    show.add_argument("--tokens", type=int, default=8, help="token ids to show per node")
    learn = commands.add_parser("train", help="the learner: train on a run's complete groups and publish")
    run_dir_flag(learn)
    store_flag(learn)  # a folder here is the older spelling of --run-dir
    learn.add_argument("--gateway", help="gateway root URL to publish each new version to (admin route); several, "
                                         "comma-separated: every gateway of the run")
    learn.add_argument("--admin-token", help="the gateway's admin token (or ARBORL_ADMIN_TOKEN)")
    learn.add_argument("--resume", action="store_true", help="continue from the run's last committed step")
    learn.add_argument("--config", help="YAML or TOML configuration file (its learner section)")
    learn.add_argument("--model", help="starting weights (default: what the run's gateway serves)")
    learn.add_argument("--device", help="cpu, cuda or cuda:N")
    learn.add_argument("--lr", type=float)
    learn.add_argument("--groups-per-step", type=int)
    learn.add_argument("--max-staleness", type=int)
    learn.add_argument("--mcla-passes", type=int)
    learn.add_argument("--backend", choices=["torch", "fsdp", "megatron"],
                       help="training backend: torch (one process), fsdp (FSDP2 over --nproc ranks) or megatron "
                            "(megatron-core over --nproc ranks)")
    learn.add_argument("--nproc", type=int, help="ranks of the fsdp or megatron backend (one GPU each on GPUs)")
    learn.add_argument("--tensor-parallel", type=int,
                       help="megatron: ranks that split each weight (divides --nproc; the rest are data-parallel)")
    learn.add_argument("--max-steps", type=int, help="stop after this many committed steps")
    learn.add_argument("--idle-exit", type=float, help="stop when no group completes for this many seconds")
    learn.add_argument("--metrics-port", type=int, help="serve the learner's Prometheus metrics on this port")
    learn.add_argument("--metrics-host", default="127.0.0.1",
                       help="address the metrics port binds (default 127.0.0.1; 0.0.0.0 in a cluster pod)")
    evaluate = commands.add_parser("eval", help="run agents on a dataset's tasks and report pass@k")
    add_rollout_flags(evaluate)
    from arborl.scaffold_adapters.registry import ADAPTERS

    evaluate.add_argument("--scaffold", default="builtin",
                          help=f"comma-separated: builtin, {', '.join(ADAPTERS)}, oracle, nop")
    evaluate.add_argument("--k", type=int, default=1, help="rollouts per task and scaffold (pass@1 ... pass@k)")
    evaluate.add_argument("--prefix", default="eval", help="names this evaluation's groups, so a rerun resumes it")
    evaluate.add_argument("--report-dir", type=Path, help="where results.json and report.html go (default RUN/eval)")
    produce = commands.add_parser("rollout", help="produce groups of rollouts with rewards for the learner")
    add_rollout_flags(produce)
    produce.add_argument("--scaffold", default="builtin", help="one scaffold, or a mixture: builtin:3,opencode:1")
    produce.add_argument("--group-size", type=int, help="rollouts per group (G)")
    produce.add_argument("--groups", type=int, help="stop after this many groups (default: go on until Ctrl-C)")
    produce.add_argument("--prefix", default="train", help="names this stream of groups, so a rerun resumes it")
    add_ops_flags(commands.add_parser("ops", help="operate a running run: pause, drain, roll back, promote, set"))
    link = commands.add_parser("connect", help="configuration that points an agent CLI at the gateway")
    link.add_argument("scaffold", help="claude-code, codex, opencode or cline")
    link.add_argument("--config", help="the gateway's configuration file (for its address and keys)")
    link.add_argument("--url", help="gateway root URL (default http://HOST:PORT from the configuration)")
    link.add_argument("--key", help="API key the agent sends (default: the first configured key)")
    link.add_argument("--model", help="model name (default: what the running gateway serves)")
    link.add_argument("--session", help="file every call of this agent under this session id")
    link.add_argument("--write-home", type=Path, help="write the configuration files into this HOME folder")
    report = commands.add_parser("report", help="write RUN/report.html: charts and tables of a training run")
    run_dir_flag(report)
    store_flag(report)
    report.add_argument("run", type=Path, nargs="?", help=argparse.SUPPRESS)  # the older spelling: arborl report RUN
    add_store_flags(commands.add_parser("store", help="copy a run's store into another database"))
    add_deploy_flags(commands.add_parser("deploy", help="write a cluster deployment: Kubernetes manifests"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _interruptible()
    _stop_when_the_supervisor_dies()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        _run_command(args)
    except ConfigError as exc:  # the user's mistake, said plainly: no traceback
        raise SystemExit("\n".join(f"arborl: {line}" for line in str(exc).splitlines())) from None


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "up":
        from .up import run_up

        overrides = _overrides(args)
        up_flags = {"dataset": args.dataset, "heldout_every": args.heldout_every, "ray_address": args.ray,
                    "ray_node_ip": args.ray_node_ip}
        overrides["up"] = {k: v for k, v in up_flags.items() if v is not None}
        run_up(load_config(args.config, overrides, defaults=UP_DEFAULTS), max_seconds=args.max_seconds)
    elif args.command == "serve":
        serve(load_config(args.config, _overrides(args), defaults=SERVE_DEFAULTS))
    elif args.command == "connect":
        connect(args)
    elif args.command == "train":
        train(args)
    elif args.command == "eval":
        eval_command(args)
    elif args.command == "rollout":
        rollout_command(args)
    elif args.command == "ops":
        ops_command(args)
    elif args.command == "store":
        store_command(args)
    elif args.command == "deploy":
        deploy_command(args)
    elif args.command == "report":
        from .run_report import write_run_report

        try:
            print(write_run_report(args.run or args.run_dir, store_url=_configured_store(args.store)))
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"arborl: {exc}") from None
    elif args.trie_command == "list":
        trie_list(args.run_dir, _configured_store(args.store))
    else:
        trie_show(args.run_dir, _configured_store(args.store), args.session, args.html, args.tokens)


def _configured_store(flag: str | None) -> str:
    """The store URL of a command without a configuration file: the flag, else ARBORL_STORE__URL."""
    return load_config(None, {"store": {"url": flag}} if flag else None).store.url


if __name__ == "__main__":
    main(sys.argv[1:])
