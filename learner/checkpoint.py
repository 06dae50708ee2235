"""Learner checkpoints: a Hugging Face model folder plus the optimiser's state.

    checkpoints/step-000012/
        config.json, model.safetensors, generation_config.json   (save_pretrained: loads in
        tokenizer files                                            transformers, SGLang, arborl)
        training_state.pt   optimiser, LR schedule, step, version, RNG (the torch backend;
                            the fsdp and megatron backends write their sharded state beside
                            it, see their modules)

A checkpoint is written under a ``.partial`` name and renamed when complete, so a folder with the
final name is always whole. Whether it counts is decided by the run ledger: only a checkpoint
whose step is committed there is resumed from (see ``rollout.store.ledger``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .backends.base import TrainingBackend

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(folder: Path, backend: TrainingBackend, *, tokenizer_dir: Path | None = None,
                    step: int = 0, version: int = 0) -> Path:
    """Write the checkpoint whole, or not at all (a crash leaves only a ``.partial`` folder).

    Collective: every rank of the backend calls it; rank 0 owns the folder (clears, completes and
    renames it), and every rank writes its part in between (``TrainingBackend.save``).
    """
    partial = folder.with_name(folder.name + ".partial")
    leader = backend.rank == 0
    if leader:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    backend.barrier()  # no rank writes into a folder before it is cleared
    backend.save(partial, step=step, version=version)
    if leader:
        for name in _TOKENIZER_FILES:
            if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, partial / name)
        for path in sorted(partial.rglob("*")):  # on disk before the rename makes the folder count
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)  # an uncommitted leftover of a crashed step
        os.replace(partial, folder)
    backend.barrier()  # every rank returns with the checkpoint in place
    return folder


def prune_checkpoints(run_dir: Path, *, keep: list[Path]) -> None:
    """Delete every checkpoint folder but ``keep`` (uncommitted leftovers and ``.partial`` ones included)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    kept = {path.resolve() for path in keep}
    for path in root.iterdir():
        if path.is_dir() and path.resolve() not in kept:
            shutil.rmtree(path, ignore_errors=True)
