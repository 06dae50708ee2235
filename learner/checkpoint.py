"""Learner checkpoints: a Hugging Face model folder plus the optimiser's state.

    checkpoints/step-000012/
        config.json, model.safetensors, generation_config.json   (save_pretrained: loads in
        tokenizer files                                            transformers, SGLang, arborl)
        training_state.pt   optimiser, LR schedule, step, version, RNG

A checkpoint is written under a ``.partial`` name and renamed when complete, so a folder with the
final name is always whole. Whether it counts is decided by the run ledger: only a checkpoint
whose step is committed there is resumed from (see ``rollout.store.ledger``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

TRAINING_STATE = "training_state.pt"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(folder: Path, model, *, tokenizer_dir: Path | None = None, optimizer=None, scheduler=None,
                    step: int = 0, version: int = 0) -> Path:
    """Write the checkpoint whole, or not at all (a crash leaves only a ``.partial`` folder)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, partial / name)
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                 "step": step, "version": version, "rng": torch.get_rng_state()}
        torch.save(state, partial / TRAINING_STATE)
    for path in partial.iterdir():  # on disk before the rename makes the folder count
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(folder, ignore_errors=True)  # an uncommitted leftover of a crashed step
    os.replace(partial, folder)
    return folder


def load_training_state(folder: Path, optimizer, scheduler=None) -> dict[str, Any]:
    state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state


def prune_checkpoints(run_dir: Path, *, keep: list[Path]) -> None:
    """Delete every checkpoint folder but ``keep`` (uncommitted leftovers and ``.partial`` ones included)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    kept = {path.resolve() for path in keep}
    for path in root.iterdir():
        if path.is_dir() and path.resolve() not in kept:
            shutil.rmtree(path, ignore_errors=True)
