"""One learner's training state on every rank: the backend, the teachers, the reference policy.

    Learner (rank 0) --Trainer: train / save / resume / set_base_lr / full_state_dict-->
        torch:  the Trainer itself, in the learner's process
        fsdp, megatron:  a RankLeader: each call sent to ranks 1..n-1 (one pipe each) and run on
                rank 0 too, so every rank makes the same calls in the same order (their
                collectives meet)

The follower ranks are processes this module starts (torch.multiprocessing, spawn) on this
machine; they run only what the leader sends. A follower that dies ends the leader's next
collective with an error (or its next call with :class:`RankFailed`), and the learner stops: a
restart resumes from the last committed step, like after any crash. A leader that dies closes
the pipes, and its followers exit.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .backends import BackendSpec
from .backends.base import BackendRefused, Scorer, TrainingBackend, refuse_unknown_attention
from .backends.hf_model import load_frozen
from .backends.torch_backend import TorchBackend
from .checkpoint import save_checkpoint
from .train_step import RolloutSample, StepConfig, train_step

BACKENDS = ("torch", "fsdp", "megatron")


class RankFailed(RuntimeError):
    """A data-parallel rank exited; the learner cannot go on with fewer."""


class Trainer:
    """One rank's part: its backend, and full copies of the teachers and the reference."""

    def __init__(self, backend: TrainingBackend, *, teachers: Mapping[str, Scorer] | None = None,
                 reference: Scorer | None = None, tokenizer_dir: Path | None = None):
        self.backend, self.teachers, self.reference = backend, dict(teachers or {}), reference
        self.tokenizer_dir = tokenizer_dir

    def train(self, samples: Sequence[RolloutSample], config: StepConfig, *, distill: bool = True) -> dict[str, float]:
        return train_step(self.backend, samples, config, teachers=self.teachers if distill else {},
                          reference=self.reference)

    def save(self, folder: Path, *, step: int, version: int) -> Path:
        return save_checkpoint(folder, self.backend, tokenizer_dir=self.tokenizer_dir, step=step, version=version)

    def resume(self, folder: Path) -> dict[str, Any]:
        return self.backend.load_training_state(folder)

    def set_base_lr(self, lr: float) -> None:
        self.backend.set_base_lr(lr)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.backend.full_state_dict()

    @property
    def pids(self) -> list[int]:
        """The process id of each rank (rank 0 first)."""
        return [os.getpid()]

    def close(self) -> None:
        self.backend.close()


def check_spec(spec: BackendSpec) -> None:
    """Refuse (``BackendRefused``) what the chosen backend cannot do, before any rank starts."""
    s = spec.settings
    if s.backend not in BACKENDS:
        raise BackendRefused(f"learner.backend must be one of {', '.join(BACKENDS)}, got {s.backend!r}")
    if s.nproc < 1:
        raise BackendRefused(f"learner.nproc must be at least 1, got {s.nproc}")
    if s.backend == "torch" and s.nproc != 1:
        raise BackendRefused(f"the torch backend runs one process; learner.nproc={s.nproc} needs backend fsdp")
    if s.backend != "megatron" and (s.tensor_parallel, s.pipeline_parallel) != (1, 1):
        raise BackendRefused(f"tensor and pipeline parallel sizes are megatron settings; the {s.backend} backend "
                             "runs data-parallel only")
    if s.backend == "megatron":
        if s.tensor_parallel < 1 or s.nproc % s.tensor_parallel:
            raise BackendRefused(f"learner.tensor_parallel={s.tensor_parallel} must divide learner.nproc={s.nproc}")
        if s.pipeline_parallel != 1:
            raise BackendRefused("learner.pipeline_parallel > 1 is not built: pipeline stages need the loss "
                                 "inside megatron's pipeline schedule")
    refuse_unknown_attention(s.backend, _backend_class(s.backend).attentions, s.attention)
    if s.backend == "megatron":  # the model must map onto megatron's layers at this TP size
        from transformers import AutoConfig

        from .backends.megatron_model import refuse_unsupported

        refuse_unsupported(AutoConfig.from_pretrained(spec.weights), tensor_parallel=s.tensor_parallel)
    if spec.device == "cuda" and s.nproc > torch.cuda.device_count():
        raise BackendRefused(f"learner.nproc={s.nproc} ranks need as many GPUs; this machine has "
                             f"{torch.cuda.device_count()}")


def _backend_class(kind: str) -> Any:
    if kind == "megatron":
        try:
            import megatron.core  # noqa: F401  (the backend imports it lazily; fail here, with a message)
        except ImportError as error:
            raise BackendRefused(f"the megatron backend needs megatron-core (pip install 'arborl[megatron]'): "
                                 f"{error}") from error
        from .backends.megatron_backend import MegatronBackend

        return MegatronBackend
    if kind == "fsdp":
        from .backends.fsdp_backend import FsdpBackend

        return FsdpBackend
    return TorchBackend


def _rank_trainer(spec: BackendSpec, rank: int) -> Trainer:
    device = f"cuda:{rank}" if spec.device == "cuda" and spec.settings.backend != "torch" else spec.device
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(spec.settings.seed)
    backend = _backend_class(spec.settings.backend).open(spec.weights, spec.settings, device=device, dtype=dtype)
    teachers = {domain: TorchBackend(load_frozen(path, device=device)) for domain, path in spec.teachers.items()}
    reference = TorchBackend(load_frozen(spec.reference, device=device)) if spec.reference is not None else None
    return Trainer(backend, teachers=teachers, reference=reference, tokenizer_dir=spec.tokenizer_dir)


def open_trainer(spec: BackendSpec) -> Trainer | RankLeader:
    """The learner's trainer: in this process (torch), or rank 0 of ``nproc`` ranks (fsdp, megatron)."""
    check_spec(spec)
    if spec.settings.backend == "torch":
        return _rank_trainer(spec, 0)
    return RankLeader(spec)


# -- data-parallel ranks --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join_group(spec: BackendSpec, rank: int, world: int, address: str) -> None:
    import torch.distributed as dist

    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    backend = "cpu:gloo,cuda:nccl" if spec.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec.settings.collective_timeout_s))


def _follow(rank: int, world: int, address: str, spec: BackendSpec,
            commands: multiprocessing.connection.Connection) -> None:
    """A follower rank: open its part, then run the leader's calls until it says stop or is gone."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _join_group(spec, rank, world, address)
    trainer = _rank_trainer(spec, rank)
    while True:
        try:
            call = commands.recv()
        except EOFError:  # the leader is gone
            os._exit(1)
        if call is None:
            trainer.close()
            return
        name, args, kwargs = call
        getattr(trainer, name)(*args, **kwargs)


class RankLeader:
    """Rank 0 of an fsdp or megatron learner: a :class:`Trainer` whose every call runs on all ranks."""

    def __init__(self, spec: BackendSpec):
        import torch.multiprocessing as mp

        world = spec.settings.nproc
        address = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._ranks = []
        for rank in range(1, world):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_follow, args=(rank, world, address, spec, receiver),
                                      name=f"arborl-learner-rank-{rank}", daemon=True)
            process.start()
            receiver.close()
            self._pipes.append(sender)
            self._ranks.append(process)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        _join_group(spec, 0, world, address)
        self._local = _rank_trainer(spec, 0)

    @property
    def pids(self) -> list[int]:
        """The process id of each rank (rank 0 first)."""
        return [os.getpid(), *(int(p.pid) for p in self._ranks if p.pid is not None)]

    def _check_ranks(self, wait_s: float = 0.0) -> None:
        """Raise :class:`RankFailed` if a follower has exited (waiting up to ``wait_s`` for one)."""
        for rank, process in enumerate(self._ranks, start=1):
            process.join(timeout=wait_s)
            if not process.is_alive():
                raise RankFailed(f"learner rank {rank} exited (code {process.exitcode}); restart the learner "
                                 "with --resume to go on from the last committed step")

    def _everywhere(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._check_ranks()
        try:
            for pipe in self._pipes:
                pipe.send((name, args, kwargs))
        except OSError:  # a follower's end is closed: it is gone
            self._check_ranks(wait_s=2.0)
            raise
        try:
            return getattr(self._local, name)(*args, **kwargs)
        except RuntimeError:  # a collective whose partner is gone: say which rank, not gloo's words
            self._check_ranks(wait_s=2.0)
            raise

    def train(self, samples: Sequence[RolloutSample], config: StepConfig, *, distill: bool = True) -> dict[str, float]:
        return self._everywhere("train", samples, config, distill=distill)

    def save(self, folder: Path, *, step: int, version: int) -> Path:
        return self._everywhere("save", folder, step=step, version=version)

    def resume(self, folder: Path) -> dict[str, Any]:
        return self._everywhere("resume", folder)

    def set_base_lr(self, lr: float) -> None:
        self._everywhere("set_base_lr", lr)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._everywhere("full_state_dict")

    def close(self) -> None:
        """Stop the followers (they leave the process group) and wait for them."""
        import torch.distributed as dist

        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:  # that rank is gone already
                pass
        for process in self._ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
