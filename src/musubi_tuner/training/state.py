"""Training state on disk: everything needed to continue a run exactly, written so a crash never corrupts it.

A state folder holds the LoRA weights (safetensors), the optimizer, scheduler and grad-scaler state (torch
files of plain tensors and numbers, loaded with weights_only=True), each process's RNG states, and
`train_state.json` (step, epoch, position in the epoch). It is written into a temporary folder that is
renamed into place only when complete, so `--resume auto` always finds whole states.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from musubi_tuner.errors import SharedError, UserError, stops_held
from musubi_tuner.files import (CHECKPOINT_SUFFIX, atomic_write, check_locks_still_held, content_digest, list_folder, load_torch_file,
                                lora_file_names, output_target, permission_advice, remove_folder, save_safetensors, save_torch, what_to_check)
from musubi_tuner.training.optimizers import SCHEDULE_FLAGS, parse_key_values

logger = logging.getLogger(__name__)

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


def links_another_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a link to another checkpoint's state, one the user linked in to continue it, not a place to
    keep this state in: a name of a state of another step or run than the link's, or a state in another output folder
    (beside LoRA files of its name; a link of the same name was written through: fuzz_az 1)."""
    if not Path(folder).is_symlink():
        return False
    target = Path(os.path.realpath(folder))
    name = state_run_name(target)
    if name is None:
        return False
    if target.name != Path(folder).name:
        return True
    own = lora_file_names(name)
    return any(own.fullmatch(p.name) for p in list_folder(target.parent, "training state folder") if p.is_file())


def state_home(folder: Path) -> Path:
    """Where a state folder is, as the run it belongs to keeps it: the linked-in checkpoint itself (links_another_checkpoint),
    else the folder as named (a link to a place to keep states is the output folder's own)."""
    return Path(os.path.realpath(folder)) if links_another_checkpoint(folder) else Path(folder)


def state_run_name(folder: Path) -> str | None:
    """The --output_name of the run a state folder's name is of (NAME-state, NAME-step00000006-state, NAME-000002-state),
    or None for a name no state has."""
    named = re.fullmatch(rf"(.+?){CHECKPOINT_SUFFIX}?-state", Path(folder).name)
    return named.group(1) if named else None


def save_state(folder: Path, *, network_state: dict[str, torch.Tensor], optimizer, scheduler, scaler, progress: TrainProgress,
               process_index: int, is_main: bool, wait, run: dict | None = None) -> None:
    """Write a complete state folder atomically (all processes call this; `wait` is a barrier).

    `run` (see run_identity) is recorded beside the progress, so that a resume can check it continues the same run.
    """
    linked = links_another_checkpoint(folder)  # replaced, not written through: a state of another step, linked in to
    if not linked:  # continue it, was replaced by this run's state, in its own folder, outside the run's lock (fuzz_ax 4)
        folder = output_target(folder, folder=True)  # (a link's target, a folder on another disk say; no file of the
    tmp = folder.with_name(folder.name + ".incomplete")  # user's is replaced)
    old = folder.with_name(folder.name + ".old")
    if is_main:
        check_locks_still_held(folder)
    try:
        if is_main:
            remove_folder(tmp)  # left by a run killed while writing it
            tmp.mkdir(parents=True)
        wait()
        _save_rng_states(tmp, process_index, is_main)
        if is_main:
            save_safetensors(network_state, tmp / "network.safetensors")
            save_torch({
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }, tmp / "optimizer.pt")
            # (what the other files hold: a file of another state put in one's folder resumed without a word, "at step 6"
            # with step 3's weights: fuzz_z 6)
            files = {name: content_digest(tmp / name) for name in STATE_FILES}
            with atomic_write(tmp / STATE_MARKER) as marker:
                marker.write_text(json.dumps({**asdict(progress), "run": run or {}, "files": files}, indent=1))
        wait()
        if is_main:
            _fsync_files(tmp)  # a power cut after the rename must not leave empty files in a "complete" state
            remove_folder(old)  # left by a run killed before deleting it; os.replace onto it would fail
            with stops_held():  # a Ctrl-C between these would leave the new state under .incomplete, or a .old beside it
                if folder.exists() or linked:
                    os.replace(folder, old)
                os.replace(tmp, folder)
                remove_folder(old)  # never half there: alone (see complete_states), a .old copy is taken for the state
    except BaseException as e:  # a stop, a full disk, a file-size limit, a read-only folder: the previous state is whole
        if is_main:
            with stops_held():
                shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, UserError)):
            raise
        kept = " (the previous state is kept)" if folder.is_dir() else ""
        if not folder.parent.is_dir():
            raise UserError(f"{folder}: cannot write the training state: its folder is gone (deleted or moved while the run "
                            f"was writing)") from None
        named = re.search(r"cannot write \(([^)]*)\)", str(e))  # atomic_write's message names the file and the cause
        cause = e.strerror if isinstance(e, OSError) and e.strerror else named[1] if named else str(e)
        raise UserError(f"{folder}: cannot write the training state ({cause}); {what_to_check(cause, folder.parent)}{kept}") from None
    wait()


def _save_rng_states(folder: Path, process_index: int, is_main: bool) -> None:
    """Every process's RNG state, as rng_N.pt: written by process 0, into the folder it makes. Written by each process
    to its own path, one in another current folder (a relative --output_dir) or on another machine's disk left its file
    in an .incomplete folder there, and the state was complete without it (fuzz_bd 4)."""
    import torch.distributed as dist

    mine = _rng_to_plain(rng_state())
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        save_torch(mine, folder / f"rng_{process_index}.pt")
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if is_main:
        for index, state in enumerate(everyone):
            save_torch(state, folder / f"rng_{index}.pt")


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- resuming


class DamagedState(UserError):
    """A state folder that cannot be read whole (cut files, missing parts): `--resume auto` tries an older one."""


def run_identity(*, optimizer_name: str, scheduler: str, network: dict, processes: int, batches_per_epoch: int,
                 accumulation: int, dataset: str, learning_rate: float | None = None, context_parallel: int = 1,
                 schedule: dict | None = None, session_started: float | None = None, dit_digest: str | None = None,
                 dit_in_channels: int | None = None, validation: dict | None = None, timesteps: dict | None = None,
                 process_started: float | None = None, training: dict | None = None, schedule_steps: int | None = None,
                 optimizer_settings: dict | None = None) -> dict:
    """What a resumed run must share with the saved one for the resume to continue it, not start something else
    (the learning rate: what the saved optimizer and schedule continue at, whatever the command line says).
    `schedule`: the flags that shape the learning-rate schedule (a saved schedule holds its step count only: it is
    rebuilt from them). `optimizer_settings`: the optimizer's hyperparameters, its defaults filled in
    (optimizers.optimizer_settings), by which two spellings of one optimizer are one. `session_started`: when the run began (a resumed run keeps the one of the state it continues:
    check_resumable); `process_started`: when the process that saves the state began (not kept by a resume), by which
    --resume auto prefers the newest process's states (complete_states)."""
    return {"optimizer": optimizer_name, "scheduler": scheduler, "network": network, "processes": processes,
            "context_parallel": context_parallel, "batches_per_epoch": batches_per_epoch, "gradient_accumulation_steps": accumulation, "dataset": dataset,
            "learning_rate": learning_rate, "schedule": schedule or {}, "session_started": session_started,
            "dit_digest": dit_digest, "dit_in_channels": dit_in_channels, "validation": validation, "timesteps": timesteps or {},
            "process_started": process_started, "training": training or {}, "schedule_steps": schedule_steps,
            "optimizer_settings": optimizer_settings}


def _differs(saved: dict, current: dict, key: str) -> bool:
    """Whether a part of the run identity a state recorded differs from this run's (what either lacks is not compared:
    states saved before a part was recorded, and the partial identity checked before the DiT loads)."""
    return key in saved and key in current and saved[key] != current[key]


def _same_optimizer(saved: dict, current: dict) -> bool:
    """Whether the recorded optimizers are one: the same class with the same settings, however --optimizer_args spelled
    them (both recorded since the settings were: an older state's name is compared as written)."""
    if saved.get("optimizer") == current.get("optimizer"):
        return True
    then, now = saved.get("optimizer_settings"), current.get("optimizer_settings")
    return (isinstance(then, dict) and isinstance(now, dict) and then == now
            and str(saved["optimizer"]).partition("(")[0] == str(current["optimizer"]).partition("(")[0])


def _network_as_read(network: dict) -> dict:
    """A recorded network with its --network_args as the module reads them: a number in any spelling (0.10 is 0.1) and
    without `verbose`, which only lists the modules (the same network was refused: fuzz_ad F8); a dropout of 0 is none
    (--network_dropout 0 refused the same run: fuzz_ax 9)."""
    if not isinstance(network, dict):
        return network
    network = {**network, "dropout": network.get("dropout") or None}
    if not isinstance(network.get("args"), list):
        return network
    try:
        args = parse_key_values([str(a) for a in network["args"]], "--network_args")
    except UserError:  # (a state's record this version cannot read: compared as recorded)
        return network
    args.pop("verbose", None)
    for key in ("rank_dropout", "module_dropout"):  # (0 is none, as --network_dropout 0 is: fuzz_az 5)
        if args.get(key) == 0:
            args.pop(key)
    return {**network, "args": args}


def _schedule_as_read(schedule, scheduler) -> dict:
    """A recorded table of the schedule's flags, with only those the schedule `scheduler` reads (optimizers.SCHEDULE_FLAGS;
    --lr_scheduler_type's: --lr_scheduler_args alone)."""
    if not isinstance(schedule, dict):
        return {"schedule": schedule}
    name = str(scheduler).partition(":")[0]
    read = SCHEDULE_FLAGS.get(name, ("lr_scheduler_args",))  # (any other name is --lr_scheduler_type's, dotted or not: fuzz_az 6)
    return {k: v for k, v in schedule.items() if k in read}


def _changes(then: dict, now: dict, prefix: str = "") -> str:
    """"dim 4 -> 8, ...": the entries of a recorded table (flags, with `prefix` "--") that differ from this run's."""
    return ", ".join(f"{prefix}{k} {then.get(k)} -> {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))


def check_same_processes(folder: Path, saved: dict, current: dict) -> None:
    """A state resumes on as many processes, shared out as before (--dry_run checks this alone, without joining). The
    keys `current` lacks are not compared (a partial identity: check_same_run)."""
    differs = functools.partial(_differs, saved, current)
    if differs("processes"):
        raise SharedError(f"{folder}: saved by {saved['processes']} training processes, this run has {current['processes']}; "
                          f"resume with the same number (accelerate launch --num_processes {saved['processes']}), or start a new "
                          f"run from its LoRA with --network_weights")
    if differs("context_parallel"):  # the same processes, shared out otherwise: another batch per step, other RNG roles
        then, now = saved["context_parallel"], current["context_parallel"]
        raise SharedError(f"{folder}: saved with --context_parallel {then}, this run has {now}: its processes would share out "
                          f"the work otherwise (another batch per step); resume with --context_parallel {then}, or start a new run "
                          f"from its LoRA with --network_weights")


LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt", "piecewise_constant", "adafactor")  # the rest span the run's steps


def check_same_run(folder: Path, saved: dict, current: dict, say: bool = True) -> None:
    """The identity checks of check_resumable, for the keys `current` has: the training checks a --resume folder with
    what its flags tell before the DiT loads (the network, the schedule, the processes), and all of it once loaded.
    `say`: the changes that do not refuse the resume are said (by the check once loaded: they were said twice)."""
    differs = functools.partial(_differs, saved, current)
    check_same_processes(folder, saved, current)
    if differs("optimizer") and not _same_optimizer(saved, current):
        raise SharedError(f"{folder}: saved with the optimizer {saved['optimizer']}, this run uses {current['optimizer']}; "
                        f"resume with the same --optimizer_type/--optimizer_args, or start a new run from its LoRA with "
                        f"--network_weights")
    if differs("scheduler"):
        raise SharedError(f"{folder}: saved with the learning-rate schedule {saved['scheduler']}, this run uses "
                        f"{current['scheduler']}; resume with the same --lr_scheduler and step counts, or start a new run "
                        f"from its LoRA with --network_weights")
    if differs("schedule") and (changed := _changes(*(_schedule_as_read(d["schedule"], current.get("scheduler"))
                                                      for d in (saved, current)), "--")):
        # (only its step count is saved: another warmup or ratio continued on another curve, unsaid; a flag the schedule
        # does not read is no change: --lr_scheduler_power 3 with a constant schedule refused the same run, fuzz_ax 9)
        raise SharedError(f"{folder}: saved with another learning-rate schedule ({changed}); resume with the same flags, or start "
                          f"a new run from its LoRA with --network_weights")
    if differs("network") and _network_as_read(saved["network"]) != _network_as_read(current["network"]):
        then, now = saved["network"], current["network"]
        changed = _changes(then, now)
        raise SharedError(f"{folder}: saved with another network ({changed}); resume with the same --network_module, "
                        f"--network_dim, --network_alpha and --network_args")
    if differs("dit_in_channels"):  # (the same LoRA layers: an I2V run went on as T2V, labelled T2V: fuzz_aj 7)
        from musubi_tuner.hunyuan.config import task_of

        then, now = saved["dit_in_channels"], current["dit_in_channels"]
        raise SharedError(f"{folder}: saved by a run on an {task_of(then)} DiT ({then} input channels), --dit has {now}: "
                          f"the run would go on learning another task; resume with the DiT it trained on, or start a new run "
                          f"from its LoRA with --network_weights")
    if not say:
        return
    if differs("dit_digest"):  # (the same shapes: it trains on; another model's, or the same one in another precision)
        logger.warning("%s: saved by a run on another DiT file than --dit (its contents differ); the LoRA continues on this one",
                       folder)
    if differs("validation") and isinstance(saved["validation"], dict) and isinstance(current["validation"], dict):
        # (the losses the earlier run measured, and the best file it named, were not comparable with this run's: fuzz_ak 7)
        logger.warning("%s: saved by a run that validated otherwise (%s): the validation curve changes measure here, and the "
                       "best checkpoint is named among the files validated as this run validates", folder,
                       _changes(saved["validation"], current["validation"]))
    if differs("timesteps"):  # (each side records the flags its sampling reads, states of earlier versions every flag:
        # a flag the run does not read, or did not, is no change in how it draws)
        then, now = saved["timesteps"], current["timesteps"]
        both = [k for k in now if k in then]
        changed = _changes({k: then[k] for k in both}, {k: now[k] for k in both}, "--")
    if differs("timesteps") and changed:
        logger.warning("%s: saved by a run that drew its noise levels otherwise (%s); the steps from here draw them so", folder,
                       changed)
    if differs("schedule_steps") and str(current.get("scheduler")).partition(":")[0] not in LENGTH_FREE_SCHEDULES:
        logger.warning("%s: saved by a run whose --lr_scheduler %s spans %s steps; it is built for %s here, and the rate goes "
                       "on along that curve from the saved step (a decay that had ended can start over from its middle)",
                       folder, current["scheduler"], saved["schedule_steps"], current["schedule_steps"])  # (fuzz_ax 7)
    if differs("training"):  # (changed without a word: fuzz_ax 10)
        logger.warning("%s: saved by a run of other training settings (%s); the steps from here train so", folder,
                       _changes(saved["training"], current["training"], "--"))


def check_resumable(folder: Path, saved: dict, current: dict, progress: TrainProgress) -> TrainProgress:
    """Compare a state's run identity with this run's: a mismatch that would silently train something else is a
    UserError saying what differs and what to do; a changed dataset restarts at the next epoch, with a warning.

    States saved before identities were recorded (an empty `saved`) resume unchecked.
    """
    differs = functools.partial(_differs, saved, current)
    check_same_run(folder, saved, current)
    if isinstance(saved.get("session_started"), (int, float)):  # the run it continues
        current["session_started"] = saved["session_started"]
    if differs("learning_rate"):  # the optimizer's and the schedule's saved state hold the rate: they win, as in musubi-tuner
        logger.warning("%s: saved with --learning_rate %g; its optimizer and schedule continue at that rate, not at %g, and "
                       "the LoRA's metadata records %g. To train at %g, start a new run from its LoRA with --network_weights",
                       folder, saved["learning_rate"], current["learning_rate"], saved["learning_rate"], current["learning_rate"])
        current["learning_rate"] = saved["learning_rate"]
    # the batches and their order: another --gradient_accumulation_steps groups the same batches otherwise, and the
    # position among them holds (it was moved to the next epoch, blamed on "12 batches per epoch then, 12 now": fuzz_ay 6)
    same_batching = not (differs("batches_per_epoch") or differs("dataset"))
    if same_batching and differs("gradient_accumulation_steps"):
        logger.warning("%s: saved with --gradient_accumulation_steps %s, this run has %s: epoch %d goes on after its first %d "
                       "batches, a step ending every %s batches counted from the epoch's start", folder,
                       saved["gradient_accumulation_steps"], current["gradient_accumulation_steps"], progress.epoch + 1,
                       progress.batch_in_epoch, current["gradient_accumulation_steps"])
    if same_batching and progress.batch_in_epoch > current["batches_per_epoch"]:
        raise DamagedState(f"{folder}/{STATE_MARKER}: damaged (batch_in_epoch {progress.batch_in_epoch} of an epoch of "
                           f"{current['batches_per_epoch']} batches); pick another state folder or --resume auto")
    if not same_batching:
        whole = isinstance(saved.get("batches_per_epoch"), int) and progress.batch_in_epoch >= saved["batches_per_epoch"]
        if whole:  # saved at its epoch's last batch: the epoch is done, and its end (its save, samples, validation) is the
            # resumed run's to make, not skipped with the epoch said to be left part-way (fuzz_ax 12)
            logger.warning("%s: the dataset or batching changed since this state was saved; epoch %d is complete, and "
                           "training continues with the new one from epoch %d", folder, progress.epoch + 1, progress.epoch + 2)
            progress.batch_in_epoch = current["batches_per_epoch"]
        elif progress.batch_in_epoch:
            logger.warning("%s: the dataset or batching changed since this state was saved (%s batches per epoch then, %s now); "
                           "the position inside epoch %d cannot be found again, so training continues at the start of "
                           "epoch %d", folder, saved.get("batches_per_epoch"), current["batches_per_epoch"],
                           progress.epoch + 1, progress.epoch + 2)
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        else:
            logger.warning("%s: the dataset or batching changed since this state was saved; continuing with the new one", folder)
    return progress


# torch.optim's per-parameter tensors, each of its parameter's shape (8-bit optimizers keep blocks of other shapes)
PER_PARAMETER_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")


def _check_optimizer_state(folder: Path, saved, optimizer) -> None:
    """The saved optimizer's per-parameter tensors (AdamW's moments, ...) have their parameters' shapes (torch takes any
    shape and the first step would fail deep inside the update) and finite values (a NaN moment made the first step's
    LoRA NaN, and the run blamed its learning rate and called this state good)."""
    try:
        state, groups = saved["optimizer"]["state"], saved["optimizer"]["param_groups"]
        saved_ids = [i for g in groups for i in g["params"]]
    except (KeyError, TypeError):
        return  # load_state_dict names what is missing
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, param in zip(saved_ids, params):
        for name, value in (state.get(index) or {}).items():
            if name in PER_PARAMETER_STATES and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise DamagedState(f"{folder}/optimizer.pt: {name} of parameter {index} has shape {list(value.shape)}, its "
                                   f"parameter {list(param.shape)}; pick another state folder or --resume auto")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DamagedState(f"{folder}/optimizer.pt: {name} of parameter {index} holds NaN or infinite values: no "
                                   f"state to resume from; pick an older state folder or --resume auto")
    # the numbers of the groups and the schedule (lr, eps, betas, base_lrs): a NaN there made the first update NaN, blamed
    # on --learning_rate and the items, and the damaged state was named the last good checkpoint
    numbers = [(f"{key} of param group {i}", v) for i, g in enumerate(groups) if isinstance(g, dict)
               for key, v in g.items() if key != "params"]
    schedule = saved.get("scheduler") if isinstance(saved, dict) else None
    numbers += [(f"the schedule's {key}", v) for key, v in (schedule.items() if isinstance(schedule, dict) else ())
                if key in ("base_lrs", "_last_lr")]  # (not every number of a schedule: a plateau's 'best' starts at inf)
    for what, value in numbers:
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise DamagedState(f"{folder}/optimizer.pt: {what} is {value}: no state to resume from; pick an older state "
                               f"folder or --resume auto")


def read_marker(folder: Path) -> tuple[TrainProgress, dict]:
    """(progress, run identity) of a state folder; DamagedState naming the file if it is missing or cut."""
    marker = Path(folder) / STATE_MARKER
    if Path(folder).is_dir():  # (one that cannot be listed: its error, not "train_state.json: Permission denied": fuzz_as 2)
        list_folder(folder, "training state folder")
    if not marker.is_file():
        inside = complete_states(Path(folder)) if Path(folder).is_dir() else []
        if inside:  # (--resume OUTPUT_DIR: the folder of the states, not one of them)
            raise DamagedState(f"{folder}: a folder of training states, not one: give one of them ({', '.join(p.name for p in inside[:3])}"
                               f"{', ...' if len(inside) > 3 else ''}), or --resume auto with --output_dir {folder}")
        raise DamagedState(f"{folder}: not a complete training state (no {STATE_MARKER}); pick another folder or --resume auto")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(TrainProgress)}
        values = {k: v for k, v in data.items() if k in fields}
        for k, v in values.items():  # whole numbers a run can reach: not 1.5, "3", or 10**400
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
                raise ValueError(f"{k} = {str(v)[:20]} is not a step, epoch or batch count")
        progress = TrainProgress(**values)
        run = data.get("run") or {}
        if not isinstance(run, dict):
            raise ValueError("run is not a table")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DamagedState(f"{marker}: damaged ({str(e)[:120]}); pick another state folder or --resume auto") from None
    return progress, run


def read_state_folder(folder: str | Path) -> tuple[TrainProgress, dict]:
    """read_marker of a --resume folder, after saying plainly when there is no such folder."""
    folder = Path(folder)
    try:
        folder.stat()
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):  # (Path.is_file raised it: a line without the flag, fuzz_aq 9)
            raise UserError(f"{folder}: cannot read this training state folder (--resume): {e.strerror}; "
                            f"{permission_advice(folder)}") from None
    if folder.is_file():
        hint = " (a LoRA file? start from its weights with --network_weights)" if folder.suffix == ".safetensors" else ""
        raise UserError(f"{folder}: a file, not a training state folder (--resume){hint}; give a *-state folder or --resume auto")
    if not folder.is_dir():
        raise UserError(f"{folder}: training state folder not found (--resume); give a *-state folder or --resume auto")
    return read_marker(folder)


STATE_FILES = ("network.safetensors", "optimizer.pt")  # what the marker records a digest of


def _check_files_are_its_own(folder: Path) -> None:
    """The state's files are those its marker was written with (states older than the record are not checked)."""
    try:
        recorded = json.loads((folder / STATE_MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return  # (read_marker has named what is wrong with the marker)
    if not isinstance(recorded, dict):
        return
    for name in STATE_FILES:
        if name in recorded and (folder / name).is_file() and content_digest(folder / name) != recorded[name]:
            raise DamagedState(f"{folder}/{name}: not the file this state was saved with (another state's, or changed since); "
                               f"pick another state folder or --resume auto")


def load_state(folder: Path, *, network, optimizer, scheduler, scaler, process_index: int,
               run: dict | None = None) -> TrainProgress:
    """Load a state folder into the run's objects; checks first that it belongs to this run (see check_resumable)."""
    progress, saved_run = read_state_folder(folder)
    folder = Path(folder)
    if run is not None:
        progress = check_resumable(folder, saved_run, run, progress)
    from musubi_tuner.files import StateDictFile

    try:
        weights = StateDictFile(folder / "network.safetensors", what="saved LoRA state").load_all()
        saved = load_torch_file(folder / "optimizer.pt", "optimizer state")
    except UserError as e:
        raise DamagedState(str(e)) from None
    from musubi_tuner.networks.lora_reader import first_non_finite

    if (bad := first_non_finite(weights)) is not None:  # saved by a run older than the finiteness checks, or damaged since
        raise DamagedState(f"{folder}/network.safetensors: {bad} holds NaN or infinite values: no state to resume from; pick "
                           f"an older state folder or --resume auto")
    own = network.state_dict()
    for key, t in weights.items():  # what load_state_dict would copy: of the network's shape, and floating point
        if key in own and (t.shape != own[key].shape or not t.is_floating_point()):
            raise DamagedState(f"{folder}/network.safetensors: {key} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                               f"this run's LoRA holds {str(own[key].dtype).removeprefix('torch.')} {list(own[key].shape)}; "
                               f"pick another state folder or --resume auto")
    _check_optimizer_state(folder, saved, optimizer)
    _check_files_are_its_own(folder)  # (whole, finite and of this run's shapes, but another state's: after those checks)
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("alpha")]:
        raise UserError(f"{folder}: the saved LoRA does not fit this network (missing {len(missing)}, unexpected {len(unexpected)} keys); "
                        "resume with the same --network_dim / --network_args")
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder}/optimizer.pt: does not fit this run's optimizer or schedule ({str(e)[:160]}); resume with "
                        f"the same --optimizer_type and --lr_scheduler, or start a new run with --network_weights") from None
    rng_file = folder / f"rng_{process_index}.pt"
    if rng_file.is_file():
        try:
            set_rng_state(_rng_from_plain(load_torch_file(rng_file, "RNG state")))
        except (UserError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:  # (torch's, numpy's refusals)
            logger.warning("%s: RNG state unreadable (%s); dropout and other draws differ from an uninterrupted run",
                           rng_file, str(e)[:120])
    else:  # deleted, or a state saved by fewer processes
        logger.warning("%s: no RNG state for process %d; dropout and other draws differ from an uninterrupted run", rng_file,
                       process_index)
    return progress


def read_progress(folder: Path) -> TrainProgress | None:
    """The progress saved in a state folder, or None if it has no readable one."""
    try:
        return read_marker(folder)[0]
    except UserError:
        return None


def complete_states(output_dir: Path, name: str | None = None) -> list[Path]:
    """The complete state folders in output_dir, those of the most recently started process first (the
    `process_started` of their run identity, else its `session_started`, which a resumed run keeps from its first
    start), each one's most advanced (by saved global step) first; with `name`, only
    those of that --output_name (NAME-state, NAME-step00000006-state, NAME-000002-state): another experiment saved
    in the same folder is not this run's to continue.

    Damaged markers are left out with a warning; so are folders still being written (.incomplete) and replaced
    copies (.old) whose replacement exists.
    """
    found: list[tuple[int, Path]] = []
    own = re.compile(rf"{re.escape(name)}{CHECKPOINT_SUFFIX}?-state(?:\.old)?") if name is not None else None
    for marker in Path(output_dir).glob(f"*/{STATE_MARKER}"):
        folder = marker.parent
        if own is not None and not own.fullmatch(folder.name):
            continue
        if folder.name.endswith(".incomplete"):  # being written when the run stopped
            continue
        if folder.name.endswith(".old") and folder.with_suffix("").exists():  # replaced; only a kill between the renames keeps it alone
            continue
        try:
            progress, run = read_marker(folder)
        except UserError as e:
            logger.warning("skipping %s", e)
            continue
        started = next((t for t in (run.get("process_started"), run.get("session_started")) if isinstance(t, (int, float))), 0.0)
        found.append(((started, progress.global_step), folder))
    # the newest process's states first, then by step: a run started afresh in a folder of an earlier run's states, and
    # stopped before it passed their step, was continued from the earlier run's (fuzz_z 7); a run resumed from an older
    # state of its own (a branch), and stopped, was continued from the branch it left, whose steps were further (fuzz_ax 6)
    return [folder for _, folder in sorted(found, key=lambda sf: (-sf[0][0], -sf[0][1], sf[1].name))]


def newest_state(output_dir: Path) -> Path | None:
    """The first of complete_states: the most advanced state of the most recently started run."""
    states = complete_states(output_dir)
    return states[0] if states else None
