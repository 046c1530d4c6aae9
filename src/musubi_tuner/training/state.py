"""Training state on disk: everything needed to continue a run exactly, written so a crash never corrupts it.

A state folder holds the LoRA weights (safetensors), the optimizer, scheduler and grad-scaler state (torch
files of plain tensors and numbers, loaded with weights_only=True), each process's RNG states, and
`train_state.json` (step, epoch, position in the epoch). It is written into a temporary folder that is
renamed into place only when complete, so `--resume auto` always finds whole states.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import load_torch_file, save_safetensors

STATE_MARKER = "train_state.json"


@dataclass
class TrainProgress:
    """Where the run is: optimizer steps done, the epoch being run (0-based) and batches of it already consumed."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_plain(state: dict) -> dict:
    """RNG states as tensors and JSON-able lists, so they load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss = state["python"]
    return {
        "torch": state["torch"],
        "cuda": state.get("cuda", []),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }


def _rng_from_plain(plain: dict) -> dict:
    n = plain["numpy"]
    p = plain["python"]
    state = {
        "torch": plain["torch"],
        "python": (p["version"], tuple(p["internal"]), p["gauss"]),
        "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]),
    }
    if plain.get("cuda"):
        state["cuda"] = plain["cuda"]
    return state


def save_state(folder: Path, *, network_state: dict[str, torch.Tensor], optimizer, scheduler, scaler, progress: TrainProgress,
               process_index: int, is_main: bool, wait) -> None:
    """Write a complete state folder atomically (all processes call this; `wait` is a barrier)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".incomplete")
    old = folder.with_name(folder.name + ".old")
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        wait()
        torch.save(_rng_to_plain(rng_state()), tmp / f"rng_{process_index}.pt")
        if is_main:
            save_safetensors(network_state, tmp / "network.safetensors")
            torch.save({
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }, tmp / "optimizer.pt")
            with open(tmp / STATE_MARKER, "w") as f:
                json.dump(asdict(progress), f, indent=1)
        wait()
        if is_main:
            _fsync_files(tmp)  # a power cut after the rename must not leave empty files in a "complete" state
            shutil.rmtree(old, ignore_errors=True)  # left by a run killed while deleting it; os.replace onto it would fail
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, UserError) as e:  # full disk, read-only folder: the previous state (if any) is still whole
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UserError):  # save_safetensors already named the file
            raise
        raise UserError(f"{folder}: cannot write the training state ({e.strerror or e}); check free space and permissions "
                        f"of {folder.parent}") from e
    wait()


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def load_state(folder: Path, *, network, optimizer, scheduler, scaler, process_index: int) -> TrainProgress:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: training state folder not found (--resume); give a *-state folder or --resume auto")
    if not (folder / STATE_MARKER).is_file():
        raise UserError(f"{folder}: not a complete training state (no {STATE_MARKER}); pick another folder or --resume auto")
    from musubi_tuner.files import StateDictFile

    weights = StateDictFile(folder / "network.safetensors", what="saved LoRA state").load_all()
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("alpha")]:
        raise UserError(f"{folder}: the saved LoRA does not fit this network (missing {len(missing)}, unexpected {len(unexpected)} keys); "
                        "resume with the same --network_dim / --network_args")
    saved = load_torch_file(folder / "optimizer.pt", "optimizer state")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    rng_file = folder / f"rng_{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(_rng_from_plain(load_torch_file(rng_file, "RNG state")))
    with open(folder / STATE_MARKER) as f:
        return TrainProgress(**json.load(f))


def read_progress(folder: Path) -> TrainProgress | None:
    """The progress saved in a state folder, or None if it has no readable one."""
    try:
        return TrainProgress(**json.loads((Path(folder) / STATE_MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def newest_state(output_dir: Path) -> Path | None:
    """The most advanced complete state folder in output_dir (by saved global step)."""
    best, best_step = None, -1
    for marker in Path(output_dir).glob(f"*/{STATE_MARKER}"):
        folder = marker.parent
        if folder.name.endswith(".incomplete"):  # being written when the run stopped
            continue
        if folder.name.endswith(".old") and folder.with_suffix("").exists():  # replaced; only a kill between the renames keeps it alone
            continue
        try:
            step = json.loads(marker.read_text())["global_step"]
        except (ValueError, KeyError, OSError):
            continue
        if step > best_step:
            best, best_step = folder, step
    return best
