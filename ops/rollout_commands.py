"""``arborl eval`` and ``arborl rollout``: run agents on a dataset's tasks in sandboxes.

    arborl eval --dataset humaneval --scaffold builtin,claude-code --k 3
    arborl rollout --dataset builtin --split train --scaffold builtin:3,opencode:1 --groups 20

Both serve the policy from a gateway in this process (recording into the run folder's store, on
``--port`` or a free loopback port) unless ``--gateway URL`` names a running one. Then the
rollouts' session keys and call counts come from the gateway's admin API (``--admin-token``),
and groups and rewards go to the run's store, where the gateway records the calls: its run
folder on the same machine, or ``--store postgresql://...`` from any machine.

Both show progress, and both resume: run the same command again and only the
rollouts that did not finish run.

They load only what the scaffolds need: the model-free ``oracle`` and ``nop`` get no gateway and
no model (only the run's store), and a tokenizer (transformers) is loaded only to draw the trie
page of a rollout that made model calls.

``eval`` writes ``RUN/eval/results.json`` and ``RUN/eval/report.html`` (pass@1 and pass@k per
scaffold with 95% intervals, per-task results, tokens and time, a trie page per rollout).
``rollout`` writes groups of rollouts with rewards for the learner (``arborl train``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arborl.rollout.results import RolloutResult
from arborl.rollout.sandboxes import SANDBOX_KINDS

from .config import ArborlConfig, load_config


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="builtin, humaneval, a SWE-bench-style .jsonl, or a folder "
                                                         "of Harbor tasks")
    parser.add_argument("--split", choices=["train", "heldout"], help="only this split of the dataset")
    parser.add_argument("--tasks", help="only these task ids (comma-separated)")
    parser.add_argument("--difficulty", help="only tasks of these difficulties (comma-separated: easy,medium,hard)")
    parser.add_argument("--limit", type=int, help="only the first N tasks")
    parser.add_argument("--run-dir", type=Path, help="the run folder (store, logs, report)")
    parser.add_argument("--store", help="the run's store: postgresql://user@host:port/db (default: the run "
                        "folder's store.sqlite)")
    parser.add_argument("--gateway", help="a running gateway's root URL (default: serve one in this process); "
                        "its admin API issues the rollouts' session keys and counts their calls")
    parser.add_argument("--admin-token", help="the --gateway's admin key (default: ARBORL_ADMIN_TOKEN or "
                        "gateway.admin_token)")
    parser.add_argument("--port", type=int, help="the port of the gateway served in this process (default: a free "
                                                 "one)")
    parser.add_argument("--config", help="YAML or TOML configuration file (engine and rollout sections)")
    parser.add_argument("--model", help="the model to serve in this process (default SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (the model served in this process)")
    parser.add_argument("--sandbox", choices=list(SANDBOX_KINDS), help="where agents run (default local)")
    parser.add_argument("--docker-image", help="the docker sandbox's image (bash, coreutils and the scaffolds)")
    parser.add_argument("--docker-cli", help="the docker sandbox's client: docker (default) or podman")
    parser.add_argument("--k8s-image", help="the k8s sandbox's pod image (bash, coreutils and the scaffolds)")
    parser.add_argument("--concurrency", type=int, help="rollouts at once")
    parser.add_argument("--max-turns", type=int, help="model calls per rollout")
    parser.add_argument("--agent-timeout", type=float, help="seconds per rollout's agent (at most the task's own)")
    parser.add_argument("--keep-workspaces", action="store_true", help="keep each rollout's sandbox folder")
    parser.add_argument("--metrics-port", type=int, help="serve the rollouts' Prometheus metrics on this port")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics port binds (default 127.0.0.1; 0.0.0.0 in a cluster pod)")
    parser.add_argument("--strict", action="store_true", help="stop at a malformed task (default: report it, skip "
                                                              "it, run the others)")


def _config(args: argparse.Namespace, scaffolds: dict[str, float], extra: dict[str, Any]) -> ArborlConfig:
    rollout = {"scaffolds": scaffolds, "sandbox": args.sandbox,
               "docker_image": args.docker_image, "docker_cli": args.docker_cli,
               "k8s": {"image": args.k8s_image} if args.k8s_image else None,
               "concurrency": args.concurrency,
               "max_turns": args.max_turns, "agent_timeout_s": args.agent_timeout,
               "keep_workspaces": args.keep_workspaces or None, **extra}
    overrides: dict[str, Any] = {"rollout": {k: v for k, v in rollout.items() if v is not None}}
    engine = {"model": args.model, "device": args.device}
    overrides["engine"] = {k: v for k, v in engine.items() if v is not None}
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.store:
        overrides["store"] = {"url": args.store}
    return load_config(args.config, overrides)


def parse_scaffolds(text: str) -> dict[str, float]:
    """``builtin,claude-code`` or ``builtin:3,opencode:1`` -> {name: weight}."""
    from arborl.rollout.agent_runs import check_scaffold

    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            out[check_scaffold(name)] = float(weight) if weight else 1.0
        except ValueError as exc:
            raise SystemExit(f"arborl: {exc}") from None
    return out


def report_problems(problems: list, *, strict: bool) -> None:
    """Say what is wrong with each malformed task (or task and scaffold that cannot go together);
    under ``--strict`` stop there."""
    if not problems:
        return
    lines = [f"  {problem}" for problem in problems]
    if strict:
        raise SystemExit("arborl: malformed tasks (--strict):\n" + "\n".join(lines))
    print(f"arborl: skipping {len(problems)} malformed task(s) or task/scaffold pair(s) (--strict stops instead):\n"
          + "\n".join(lines), flush=True)


def _tasks(args: argparse.Namespace) -> list:
    from arborl.rollout.task_loaders import load_dataset
    from arborl.rollout.tasks import TaskError

    problems: list[TaskError] | None = None if args.strict else []
    try:
        tasks = load_dataset(args.dataset, split=args.split, problems=problems)
    except (TaskError, FileNotFoundError) as exc:
        raise SystemExit(f"arborl: {exc}") from None
    report_problems(problems or [], strict=False)
    if args.tasks:
        wanted = [name.strip() for name in args.tasks.split(",")]
        known = {task.id: task for task in tasks}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise SystemExit(f"arborl: no task {', '.join(missing)} in {args.dataset}")
        tasks = [known[name] for name in wanted]
    if args.difficulty:
        levels = {level.strip() for level in args.difficulty.split(",")}
        known_levels = {task.difficulty for task in tasks}
        if not levels <= known_levels:
            raise SystemExit(f"arborl: no task of difficulty {', '.join(sorted(levels - known_levels))} in "
                             f"{args.dataset} (it has {', '.join(sorted(known_levels))})")
        tasks = [task for task in tasks if task.difficulty in levels]
    if args.limit is not None:
        tasks = tasks[: args.limit]
    if not tasks:
        raise SystemExit(f"arborl: {args.dataset} has no tasks to run")
    return tasks


def _runnable(tasks: list, scaffolds: list[str], *, strict: bool) -> list:
    """The tasks every scaffold of a mixture can run (any of them may be drawn for any task)."""
    from arborl.rollout.agent_runs import cannot_run

    problems = [problem for task in tasks for name in scaffolds if (problem := cannot_run(name, task))]
    report_problems(problems, strict=strict)
    return [task for task in tasks if not any(cannot_run(name, task) for name in scaffolds)]


@dataclass
class Session:
    """What a rollout command works against: the gateway, the run's store and ledger."""

    url: str  # "" when no scaffold uses a model: no gateway
    model: str
    store: Any
    ledger: Any
    engine: Any  # the in-process engine, or None for an external gateway (or none at all)
    load_tokenizer: Callable[[], Any]  # the served model's tokenizer, or None; called when one is needed
    policy_version: int | None = None  # what the gateway serves, as it says (None: it did not say)
    sessions: Any = None  # how session keys and call counts are asked for (None: the store, in process)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)

    def tokenizer(self) -> Any:
        """Loaded on first use (transformers takes seconds to import), then kept."""
        if not self._loaded:
            self._tokenizer, self._loaded = self.load_tokenizer(), True
        return self._tokenizer


NO_MODEL = "none (model-free scaffolds)"


def uses_model(scaffolds: dict[str, float]) -> bool:
    from arborl.rollout.agent_runs import MODEL_FREE_SCAFFOLDS

    return any(weight > 0 and name not in MODEL_FREE_SCAFFOLDS for name, weight in scaffolds.items())


@contextlib.contextmanager
def _session(config: ArborlConfig, gateway_url: str | None, *, needs_model: bool = True,
             port: int | None = None, admin_token: str | None = None) -> Iterator[Session]:
    from arborl.rollout.gateway_sessions import GatewaySessionError, GatewaySessions
    from arborl.rollout.store import STORE_FILE_NAME, RunLedger

    from .connect import served_model
    from .local_gateway import open_run_store

    run_dir = config.run_dir
    if gateway_url is None and not needs_model:  # only the store: no gateway, no model
        run_dir.mkdir(parents=True, exist_ok=True)
        store = open_run_store(config, run_dir)
        try:
            yield Session("", NO_MODEL, store, RunLedger(store), None, lambda: None)
        finally:
            store.close()
        return
    if gateway_url is None:
        from .local_gateway import start_local_gateway

        gateway = start_local_gateway(config, run_dir, port=port)
        try:
            tokenizer = getattr(gateway.engine, "tokenizer", None)
            yield Session(gateway.url, gateway.engine.model_name, gateway.store, RunLedger(gateway.store),
                          gateway.engine, lambda: tokenizer, getattr(gateway.engine, "version", None))
        finally:
            gateway.stop()
            gateway.store.close()
        return
    store_path = run_dir / STORE_FILE_NAME
    if not config.store.url and not store_path.is_file():
        raise SystemExit(f"arborl: with --gateway, give the gateway's store (--store URL) or its run folder "
                         f"(--run-dir; no {store_path})")
    admin_key = admin_token or os.environ.get("ARBORL_ADMIN_TOKEN") or config.gateway.admin_token
    if not admin_key:
        raise SystemExit("arborl: with --gateway, give the gateway's admin key (--admin-token, ARBORL_ADMIN_TOKEN "
                         "or gateway.admin_token): its admin API issues the rollouts' session keys")
    model = served_model(gateway_url, config.gateway.api_keys[0] if config.gateway.api_keys else "arborl")
    if model is None:
        raise SystemExit(f"arborl: no gateway answers at {gateway_url}")
    run_dir.mkdir(parents=True, exist_ok=True)
    store = open_run_store(config, run_dir)
    sessions = GatewaySessions(gateway_url, admin_key)
    try:
        sessions.check()
    except GatewaySessionError as exc:
        sessions.close()
        store.close()
        raise SystemExit(f"arborl: {exc}") from None
    try:
        yield Session(gateway_url.rstrip("/"), model, store, RunLedger(store), None, lambda: _run_tokenizer(run_dir),
                      served_version(gateway_url), sessions)
    finally:
        sessions.close()
        store.close()


def served_version(url: str) -> int | None:
    """The policy version a running gateway serves (GET /readyz), or None if it does not say."""
    import httpx

    try:
        version = httpx.get(url.rstrip("/") + "/readyz", timeout=5.0).json().get("policy_version")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def _run_tokenizer(run_dir: Path) -> Any:
    import json

    info = run_dir / "run.json"
    model_dir = json.loads(info.read_text()).get("model_dir") if info.is_file() else None
    if not model_dir:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class ProgressLine:
    """Progress of a rollout command: a live bar on a terminal, one line per rollout otherwise.
    It keeps every result it was shown (``results``): what an interrupted run reports."""

    def __init__(self, total: int | None, label: str):
        self.total = total
        self.label = label
        self.done = self.solved = self.failed = self.verifier_failed = 0
        self.reused = 0  # results of an earlier run of the same plan
        self.results: list[RolloutResult] = []
        self.reward = 0.0
        self.started = time.monotonic()
        self._bar: Any = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
            self._task = self._bar.add_task(label, total=total, stats="")
            self._bar.start()

    def __call__(self, result: RolloutResult, resumed: bool) -> None:
        self.results.append(result)
        self.done += 1
        self.reused += int(resumed)
        if result.status == "done":
            self.solved += int(result.solved)
            self.reward += result.reward or 0.0
        elif result.status == "verifier_failed":
            self.verifier_failed += 1
        else:
            self.failed += 1
        graded = self.done - self.failed - self.verifier_failed
        stats = (f"solved {self.solved}/{graded}  mean reward {self.reward / max(graded, 1):.3f}"
                 + (f"  infra failures {self.failed}" if self.failed else "")
                 + (f"  verifier failures {self.verifier_failed}" if self.verifier_failed else ""))
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, stats=stats)
            return
        where = "(done before)" if resumed else f"{result.timings.total_s:6.1f}s"
        outcome = (f"reward {result.reward:g}" if result.status == "done"
                   else f"{result.status.replace('_', ' ')}: {result.details[:80]!r}")
        total = f"/{self.total}" if self.total else ""
        print(f"[{self.done}{total}] {result.task_id} {result.scaffold}: {outcome} {result.ended_by} {where}  "
              f"| {stats}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _orchestrator(config: ArborlConfig, session: Session, on_result: Callable[[RolloutResult, bool], None],
                  metrics_port: int | None, metrics_host: str = "127.0.0.1"):
    import logging

    from arborl.rollout.metrics import RolloutMetrics

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model call would drown the progress
    from arborl.rollout.orchestrator import Orchestrator

    metrics = RolloutMetrics()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    orchestrator = Orchestrator(session.ledger, config.run_dir, session.url, session.model, settings=config.rollout,
                                on_result=on_result, metrics=metrics, policy_version=session.policy_version,
                                sessions=session.sessions)
    return orchestrator


def eval_command(args: argparse.Namespace) -> None:
    from arborl.rollout.orchestrator import OrchestratorError, eval_plans

    from .eval_report import Planned

    scaffolds = parse_scaffolds(args.scaffold)
    if args.run_dir is None:
        args.run_dir = Path("runs") / f"eval-{Path(args.dataset).stem}"
    config = _config(args, scaffolds, {})
    tasks = _tasks(args)
    unrunnable: list = []
    plans = eval_plans(tasks, list(scaffolds), args.k, prefix=args.prefix, problems=unrunnable)
    report_problems(unrunnable, strict=args.strict)
    progress = ProgressLine(len(plans) * args.k, f"eval {args.dataset}")
    interrupted = False
    with _session(config, args.gateway, needs_model=uses_model(scaffolds), port=args.port,
                  admin_token=args.admin_token) as session:
        orchestrator = _orchestrator(config, session, progress, args.metrics_port, args.metrics_host)
        try:
            orchestrator.preflight(tasks)
            orchestrator.run(plans)
        except OrchestratorError as exc:
            raise SystemExit(f"arborl: {exc}") from None
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
        # what was reported as it came, failures included (an interrupted run's too)
        results = list(progress.results)
        planned = [Planned(plan.task.id, plan.scaffolds[0], len(plan.scaffolds),
                           tuple(orchestrator.abandoned_attempts.get((plan.task.id, plan.scaffolds[0]), ())))
                   for plan in plans]
        version = session.policy_version
        meta = {"dataset": args.dataset, "split": args.split or "all", "tasks": len(tasks), "model": session.model,
                "policy_version": version if version is not None else
                ("served by " + session.url if session.url else "none (no model used)"),
                "sandbox": config.rollout.sandbox, "scaffolds": ", ".join(scaffolds), "k": args.k,
                "complete": not interrupted, "reused results": progress.reused,
                "plans changed since the last run": orchestrator.changed_plans}
        out = args.report_dir or config.run_dir / "eval"
        json_path, html_path = write_eval_report(config.run_dir, out, results, args.k, meta, session, planned)
    print_summary(results, args.k)
    print_reuse(progress.reused, progress.done, orchestrator.changed_plans)
    print(f"arborl: wrote {html_path} and {json_path}")
    if interrupted:
        print("arborl: interrupted; run the same command again to finish the rollouts that did not", flush=True)
        raise SystemExit(130)


def write_eval_report(run_dir: Path, out: Path, results: list[RolloutResult], k: int, meta: dict[str, Any],
                      session: Session, planned: list | None = None) -> tuple[Path, Path]:
    from .eval_report import summarize, write_report
    from .trie_view import render_trie_html

    tries = out / "tries"
    tries.mkdir(parents=True, exist_ok=True)
    drawn: set[str] = set()
    for result in results:
        if result.status == "done" and result.turns > 0:
            try:
                html = render_trie_html(session.store, result.session_id, tokenizer=session.tokenizer())
            except KeyError:
                continue
            (tries / f"{result.session_id}.html").write_text(html)
            drawn.add(result.session_id)
    summary = summarize(results, k, planned=planned or ())
    return write_report(
        summary, results, out, title=f"arborl eval: {meta['dataset']}", meta=meta,
        trie_href=lambda session_id: f"tries/{session_id}.html" if session_id in drawn else None,
        log_href=lambda result: os.path.relpath(run_dir / result.log, out) if result.log else None,
    )


def print_summary(results: list[RolloutResult], k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from .eval_report import summarize

    summary = summarize(results, k)
    table = Table(title=f"pass rates (95% bootstrap intervals over tasks), k = {k}")
    ks = [1, k] if k > 1 else [1]
    for column in ("scaffold", "tasks", "rollouts", *(f"pass@{j}" for j in ks), "mean reward", "tokens/rollout",
                   "s/rollout", "infra failures", "verifier failures"):
        table.add_column(column, justify="left" if column == "scaffold" else "right")
    for row in summary.scaffolds:
        rates = [row.pass_at.get(j) for j in ks]
        shown = [f"{r.value:.1%} [{r.low:.0%}, {r.high:.0%}]" if r is not None else "-" for r in rates]
        table.add_row(row.scaffold, str(row.tasks), str(row.rollouts), *shown, f"{row.mean_reward:.3f}",
                      f"{row.mean_prompt_tokens + row.mean_completion_tokens:,.0f}", f"{row.mean_seconds:.1f}",
                      str(row.infra_failed), str(row.verifier_failed))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def print_reuse(reused: int, total: int, changed: int) -> None:
    """How much of the result came from an earlier run, and how much ran again because its plan
    changed (task content, scaffold, sandbox, model or limits)."""
    if reused or changed:
        print(f"arborl: {reused} of {total} results reused from an earlier run of the same plans; "
              f"{changed} group(s) ran again because their plan changed", flush=True)


def rollout_command(args: argparse.Namespace) -> None:
    from arborl.rollout.orchestrator import OrchestratorError, training_plans

    scaffolds = parse_scaffolds(args.scaffold)
    if args.run_dir is None:
        args.run_dir = Path("runs/default")
    config = _config(args, scaffolds, {"group_size": args.group_size})
    tasks = _runnable(_tasks(args), [name for name, weight in scaffolds.items() if weight > 0], strict=args.strict)
    total = args.groups * config.rollout.group_size if args.groups else None
    progress = ProgressLine(total, f"rollouts {args.dataset}")
    # a synchronous run waits on the gateway for each new version, whatever its scaffolds
    needs_gateway = uses_model(scaffolds) or config.rollout.synchronous
    with _session(config, args.gateway, needs_model=needs_gateway, port=args.port,
                  admin_token=args.admin_token) as session:
        orchestrator = _orchestrator(config, session, progress, args.metrics_port, args.metrics_host)
        try:
            orchestrator.preflight(tasks)
            plans = training_plans(tasks, config.rollout, prefix=args.prefix)
            if config.rollout.synchronous:
                from arborl.rollout.learner_gate import LearnerGate

                gate = LearnerGate(session.ledger, session.url, groups_per_step=config.learner.groups_per_step,
                                   active_rollouts=orchestrator.active_rollouts)
                plans = gate.gated(plans, orchestrator.stop)
            orchestrator.run(plans, max_groups=args.groups)
        except OrchestratorError as exc:
            raise SystemExit(f"arborl: {exc}") from None
        except KeyboardInterrupt:
            print("\narborl: interrupted; run the same command again to continue", flush=True)
            raise SystemExit(130) from None
        finally:
            progress.close()
        complete = len(session.ledger.pending_groups())
    print_reuse(progress.reused, progress.done, orchestrator.changed_plans)
    print(f"arborl: {progress.done} rollouts; {complete} complete groups wait for the learner in {config.run_dir}")
