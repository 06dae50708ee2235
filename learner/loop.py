"""The asynchronous learner loop (DESIGN section 5).

    complete groups (rollout.store.ledger) --> drop the stale and the uninformative --> train_step
        --> checkpoint (weights + optimiser) --> commit step + consumed groups (one transaction)
        --> publish version v + 1 to serving

Rollouts keep being sampled by the served policy while the learner trains; a group whose oldest
token is more than ``max_staleness`` versions behind the learner is dropped and counted. The
version after step k is k (version 0 is the starting weights).

Crash safety: a step counts once its ledger commit lands. Resuming loads the checkpoint of the
last committed step (weights, optimiser, schedule, RNG), deletes checkpoints no commit refers to,
and takes the groups no committed step consumed, so a ``kill -9`` anywhere neither loses nor
repeats a group. If serving is behind the learner (a crash between commit and publish, or a
restarted gateway), the latest version is published again at start.

Non-finite steps: when ``train_step`` skips its optimizer step (a NaN or infinite loss or gradient
norm), the weights are those of the last committed step, so there is nothing to checkpoint,
commit or publish, and the step number stays free. Its groups are dropped with the reason
``non_finite`` (and its feedback marked used), in one ledger transaction, counted and logged:
kept pending, they would give the same non-finite step again and hold up every group behind them;
dropped, they are neither trained nor lost (the ledger says which and why). Calls the learner
refuses (``learner.group_data``) are counted when their group is consumed or dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from arborl.rollout.store import RunControls, RunLedger

from .backends import BackendSpec
from .backends.base import BackendRefused
from .checkpoint import checkpoint_folder, prune_checkpoints
from .core_algos import check_same_tokenizer
from .feedback_data import load_feedback
from .group_data import GroupSamples, load_group
from .metrics import LearnerMetrics
from .publish import Publisher
from .settings import LearnerSettings
from .trainer import open_trainer

log = logging.getLogger("arborl.learner")

NON_FINITE = "non_finite"  # why a skipped step's groups were dropped


class LearnerError(RuntimeError):
    """The learner cannot start as asked (e.g. a run with committed steps, started without resume)."""


@dataclass
class StepReport:
    step: int
    version: int
    groups: list[int]
    metrics: dict[str, float]
    skipped: bool = False  # a non-finite step: nothing committed or published, its groups dropped


class Learner:
    def __init__(
        self,
        ledger: RunLedger,
        run_dir: Path,
        settings: LearnerSettings,
        *,
        base_model: Path,
        publisher: Publisher | None = None,
        resume: bool = False,
        device: str | None = None,
        teachers: dict[str, Path] | None = None,
        metrics: LearnerMetrics | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.ledger, self.run_dir, self.settings = ledger, Path(run_dir), settings
        self.base_model, self.publisher = Path(base_model), publisher
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics = metrics or LearnerMetrics()
        self.progress = progress or log.info
        self._progress_is_log = progress is None  # then warnings go to the log as warnings
        self.controls = RunControls(ledger.store)  # what operators set at run time (rollout/store/controls.py)
        self._paused_said = False
        self._distills = bool(teachers)
        self._open(resume, {domain: Path(path) for domain, path in (teachers or {}).items()})

    # -- start and resume ---------------------------------------------------------------------

    def _open(self, resume: bool, teachers: dict[str, Path]) -> None:
        from transformers import AutoTokenizer

        last = self.ledger.last_step()
        if last is not None and not resume:
            raise LearnerError(
                f"{self.run_dir} already has {last.step} committed training steps; resume them (--resume) "
                "or use another run folder"
            )
        if teachers:
            ours = AutoTokenizer.from_pretrained(self.base_model)
            for folder in teachers.values():
                check_same_tokenizer(ours, AutoTokenizer.from_pretrained(folder))
        torch.manual_seed(self.settings.seed)
        source = Path(last.checkpoint) if last else self.base_model
        spec = BackendSpec(weights=source, settings=self.settings, device=self.device.type, teachers=teachers,
                           reference=self.base_model if self.settings.kl_coef > 0 else None,
                           tokenizer_dir=self.base_model)
        try:
            self.trainer = open_trainer(spec)
        except BackendRefused as exc:
            raise LearnerError(str(exc)) from None
        self.step, self.version = 0, 0
        if last is not None:
            state = self.trainer.resume(source)
            self.step, self.version = last.step, last.version
            assert (state["step"], state["version"]) == (last.step, last.version), "checkpoint and ledger disagree"
        self._prune()
        self.metrics.step.set(self.step)
        self.metrics.version.set(self.version)
        pids = self.trainer.pids
        ranks = f" on {len(pids)} {self.settings.backend} ranks (pids {' '.join(map(str, pids))})" if pids[1:] else ""
        self.progress(f"learner: {'resumed at step ' + str(self.step) if last else 'starting'} from {source}, "
                      f"version {self.version}{ranks}")

    def close(self) -> None:
        """Stop the learner's ranks (an fsdp learner's follower processes)."""
        self.trainer.close()

    def _prune(self) -> None:
        newest = self.ledger.steps(last=self.settings.keep_checkpoints)
        kept = self.controls.kept_versions  # rolled back to or promoted: operators may return to them
        keep = [Path(s.checkpoint) for s in newest]
        if kept:
            keep += [Path(s.checkpoint) for s in self.ledger.steps() if s.version in kept]
        prune_checkpoints(self.run_dir, keep=keep)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, *, max_steps: int | None = None, stop: threading.Event | None = None,
            idle_exit_s: float | None = None) -> None:
        """Train until ``max_steps`` steps are committed, ``stop`` is set, or no group came for ``idle_exit_s``."""
        stop = stop or threading.Event()
        self.sync_serving()
        idle_since = time.monotonic()
        while not stop.is_set() and (max_steps is None or self.step < max_steps):
            if self._paused():
                idle_since = time.monotonic()
                stop.wait(self.settings.poll_interval_s)
                continue
            if self.train_once() is not None or self.train_feedback_once() is not None:
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                self.progress(f"learner: no complete group for {idle_exit_s:.0f} s, stopping")
                return
            else:
                stop.wait(self.settings.poll_interval_s)

    def _paused(self) -> bool:
        """An operator paused training (``arborl ops pause-training``); said once per pause."""
        paused = self.controls.training_paused
        if paused != self._paused_said:
            self.progress(f"learner: training {'paused' if paused else 'resumed'} by an operator at step {self.step}")
            self._paused_said = paused
        return paused

    def apply_overrides(self) -> None:
        """Run-time settings an operator set (``arborl ops set lr=...``), from this step on."""
        overrides = self.controls.learner_overrides
        live = ("lr", "max_staleness")
        changed = {k: v for k, v in overrides.items() if k in live and getattr(self.settings, k) != v}
        if not changed:
            return
        self.settings = self.settings.model_copy(update=changed)
        if "lr" in changed:
            self.trainer.set_base_lr(self.settings.lr)  # the schedule keeps its position
        self.progress(f"learner: operator settings from step {self.step + 1}: {changed}")

    def sync_serving(self) -> None:
        """Publish the learner's version if serving is behind it (and not pinned by a rollback)."""
        if self.publisher is None or self.step == 0 or self.controls.serving_pin is not None:
            return
        try:
            served = self.publisher.served_version()
        except Exception as exc:  # noqa: BLE001 - serving may be down; the next step publishes anyway
            self.progress(f"learner: cannot ask serving for its version ({exc}); publishing after the next step")
            return
        if served < self.version:
            last = self.ledger.last_step()
            assert last is not None  # self.step > 0: a step is committed
            self._publish(Path(last.checkpoint))

    def take_groups(self) -> list[GroupSamples] | None:
        """The next ``groups_per_step`` trainable groups, oldest first; dropping the ones never to train on."""
        taken: list[GroupSamples] = []
        distill_or_kl = self._distills or self.settings.kl_coef > 0
        pending = self.ledger.pending_groups()
        if len(pending) < self.settings.groups_per_step:
            return None  # not enough yet: don't rebuild their tries on every poll
        for group in pending:
            data = load_group(self.ledger, group)
            rewards = {s.reward for s in data.samples}
            reason = None
            if data.oldest_version is None:
                reason = "no_tokens"
            elif self.version - data.oldest_version > self.settings.max_staleness:
                reason = "stale"
            elif len(rewards) == 1 and not distill_or_kl:
                reason = "uniform_reward"  # every advantage is 0: a step on it changes nothing
            if reason:
                self.ledger.drop_groups([group.id], reason)
                self.metrics.groups_dropped.labels(reason).inc()
                self._count_refused(data.refused)
                self.progress(f"learner: dropped group {group.id} ({reason})")
                continue
            taken.append(data)
            if len(taken) == self.settings.groups_per_step:
                return taken
        return None

    def train_once(self) -> StepReport | None:
        """One step if enough groups are complete (None otherwise)."""
        self.apply_overrides()  # before taking groups: max_staleness decides which ones train
        started_at = time.time()
        groups = self.take_groups()
        if groups is None:
            return None
        step, version = self.step + 1, self.version + 1
        ids = [g.group.id for g in groups]
        staleness = []
        for g in groups:
            assert g.oldest_version is not None  # take_groups drops the groups without tokens
            staleness.append(self.version - g.oldest_version)
        self.progress(f"step {step}: training on groups {ids} ({sum(g.calls for g in groups)} calls)")
        samples = [sample for g in groups for sample in g.samples]
        metrics = self.trainer.train(samples, self.settings.step_config())
        refused = sum((g.refused for g in groups), Counter())
        metrics.update(staleness_max=float(max(staleness)), staleness_mean=sum(staleness) / len(staleness),
                       started_at=started_at, calls_refused=float(refused.total()))
        if metrics["skipped"]:
            report = self._skip(step, metrics, ids)
        else:
            report = self._commit(step, version, metrics, ids, staleness)
        self._count_refused(refused)
        return report

    def train_feedback_once(self) -> StepReport | None:
        """One step on production sessions' feedback (``learner.feedback``), if any is pending."""
        mode = self.settings.feedback
        items = self.ledger.pending_feedback() if mode != "off" else []
        if not items:
            return None
        batch = load_feedback(self.ledger, items, mode, self._feedback_baseline(),
                              decay=self.settings.feedback_baseline_decay)
        if not batch.samples:  # nothing this mode learns from (rejections under sft)
            self.ledger.skip_feedback(batch.used)
            self._count_refused(batch.refused)
            return None
        step, version = self.step + 1, self.version + 1
        self.progress(f"step {step}: training on feedback for {len(batch.sessions)} sessions ({mode})")
        config = self.settings.step_config()
        if mode == "sft":
            config = replace(config, loss="sft")
        metrics = self.trainer.train(batch.samples, config, distill=False)
        metrics.update(feedback_baseline=batch.baseline, calls_refused=float(batch.refused.total()))
        if metrics["skipped"]:
            report = self._skip(step, metrics, [], feedback_ids=batch.used)
        else:
            details = {"kind": f"feedback-{mode}", "sessions": batch.sessions}
            report = self._commit(step, version, {**metrics, **details}, [], [], feedback_ids=batch.used)
        self._count_refused(batch.refused)
        return report

    def _feedback_baseline(self) -> float:
        for record in reversed(self.ledger.steps(last=50)):
            if "feedback_baseline" in record.metrics:
                return float(record.metrics["feedback_baseline"])
        return self.settings.feedback_baseline

    def _commit(self, step: int, version: int, metrics: dict, ids: list[int], staleness: list[int], *,
                feedback_ids: Sequence[int] = ()) -> StepReport:
        """Checkpoint, commit (the step and what it consumed, atomically), publish, prune."""
        self.progress(f"step {step}: saving checkpoint")
        folder = self.trainer.save(checkpoint_folder(self.run_dir, step), step=step, version=version)
        self.ledger.commit_step(step, version, str(folder), ids, {**metrics, "groups": ids},
                                feedback_ids=list(feedback_ids))
        self.step, self.version = step, version
        self.metrics.observe_step(step, version, metrics, staleness)
        self.progress(
            f"step {step}: committed version {version}; reward {metrics['reward_mean']:.3f} loss "
            f"{metrics['loss']:.4g} entropy {metrics['entropy']:.3f} {metrics['tokens_per_second']:.0f} tok/s"
        )
        self._publish(folder)
        self._prune()
        # when the step's work ended (the learner's busy time is finished_at - started_at)
        self.ledger.annotate_step(step, {"finished_at": time.time()})
        return StepReport(step, version, ids, metrics)

    def _skip(self, step: int, metrics: dict, ids: list[int], *, feedback_ids: Sequence[int] = ()) -> StepReport:
        """A step ``train_step`` skipped (see the module docstring): drop its groups, mark its
        feedback used, count and log it; no checkpoint, no commit, no new version, no publish."""
        if ids:
            self.ledger.drop_groups(ids, NON_FINITE)
            self.metrics.groups_dropped.labels(NON_FINITE).inc(len(ids))
        if feedback_ids:
            self.ledger.skip_feedback(list(feedback_ids))
        self.metrics.steps_skipped.labels(NON_FINITE).inc()
        data = f"dropped groups {ids} ({NON_FINITE})" if ids else f"marked {len(feedback_ids)} feedback used"
        message = (f"step {step}: skipped, the loss ({metrics['loss']:.4g}) or the gradient norm "
                   f"({metrics['grad_norm']:.4g}) is not finite; weights unchanged, "
                   f"version {self.version} stays; {data}")
        (log.warning if self._progress_is_log else self.progress)(message)
        return StepReport(self.step, self.version, ids, metrics, skipped=True)

    def _count_refused(self, refused: Counter[str]) -> None:
        for reason, count in refused.items():
            self.metrics.calls_refused.labels(reason).inc(count)

    def _publish(self, folder: Path) -> None:
        if self.publisher is None:
            return
        pin = self.controls.serving_pin
        if pin is not None:
            self.progress(f"learner: serving is pinned at version {pin} by a rollback; version {self.version} "
                          "is kept, not published (promote a version to publish again)")
            return
        started = time.perf_counter()
        try:
            self.publisher.publish(self.trainer.full_state_dict, folder, self.version)
        except Exception as exc:  # noqa: BLE001 - serving lags one version; training goes on
            self.metrics.publish_failures.inc()
            self.progress(f"learner: publishing version {self.version} failed: {exc}")
            return
        seconds = time.perf_counter() - started
        self.metrics.publish_duration.observe(seconds)
        self.ledger.annotate_step(self.step, {"publish_seconds": seconds, "published_at": time.time()})
        self.progress(f"learner: serving version {self.version} (published in {seconds:.2f} s)")
