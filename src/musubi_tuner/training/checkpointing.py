"""When and where training writes LoRA files and states, under musubi-tuner's names, keeping only the last N."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from musubi_tuner.distributed import patient_wait
from musubi_tuner.dtypes import str_to_dtype
from musubi_tuner.errors import UserError, stops_held
from musubi_tuner.files import (CHECKPOINT_SUFFIX, lora_file_names, refuse_a_writer_of, remove_folder, remove_leftover_temp_files, require_names_fit,
                                temporary_name)
from musubi_tuner.networks.lora_metadata import lora_module_info
from musubi_tuner.training.metadata import finish_metadata, modelspec, training_metadata
from musubi_tuner.training.state import TrainProgress, save_state

logger = logging.getLogger(__name__)

# A LoRA file's header per tensor beyond its name: `{"dtype":"BF16","shape":[3072,32],"data_offsets":[N,M]}` is about 70
# bytes with ten-digit offsets; the ComfyUI copy's names run up to 40 bytes longer than the network's own
HEADER_BYTES_PER_TENSOR = 128
SAVE_METADATA_BYTES = 16_384  # what a save adds to the run's metadata: steps, epoch, losses, the hashes, ComfyUI's naming


@contextlib.contextmanager
def replaced_together(paths: list[Path]):
    """Around the renames of files that must agree (a LoRA and its .comfyui copy): when one fails (a target held open
    or immutable, a folder in its place) after another was made, that one is undone: each file is the previous save's
    again (kept meanwhile as a hard link, named as a temporary file) or absent where there was none, not a pair of two
    saves."""
    existed = {path: path.is_file() for path in paths}
    backups = {}
    try:
        with stops_held():  # (a Ctrl-C between a link and its entry here would leave the link behind)
            for path in paths:
                if existed[path]:
                    backup = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # (a leftover's name)
                    try:
                        os.link(path, backup)
                    except OSError:  # a file system without hard links: no undo
                        continue
                    backups[path] = backup
        yield
    except BaseException:
        with stops_held():
            for path in paths:
                if path in backups and not _same_file(path, backups[path]):  # (renaming a hard link onto its twin does nothing)
                    os.replace(backups.pop(path), path)
                elif not existed[path] and path.is_file():
                    path.unlink()
        raise
    finally:
        with stops_held():
            for backup in backups.values():
                backup.unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_names_fit(output_dir: str | os.PathLike, name: str, seeds: Sequence[int] = (9_999_999_999,)) -> None:
    """Before the run: every file and folder name it derives from --output_name fits the output folder's file system.
    A name that fits alone can fail hours in: at the first save of a state, a sample (its name holds its seed: `seeds`,
    those of the sample prompts once they are read), or the final LoRA's temporary file, whose names are up to about
    55 bytes longer."""
    seed = max(map(str, seeds), key=len)
    require_names_fit(output_dir, "--output_name", name, [
        temporary_name(f"{name}.comfyui.safetensors"), temporary_name(f"{name}-step00000000-state"),
        temporary_name(f"{name}_e000000_00_{'0' * 14}_{seed}.mp4"), f"{name}-step00000000-state.incomplete"])


FP16_ROUNDING_SAID = 0.05  # a saved tensor this far (relative) from the network's is said once: fp16 rounds by at most 0.05%


def check_final_names_free(output_dir: str | os.PathLike, name: str, lora_format: str) -> None:
    """Before the run: no folder stands where the final LoRA (or its ComfyUI copy) goes, and no file (or device) where
    a LoRA or the final state goes. Found when it was written, it cost the whole run: the steps after the last saved
    state, or all of them without --save_state."""
    from musubi_tuner.files import output_target
    from musubi_tuner.networks.lora_files import companion_path

    final = Path(output_dir) / f"{name}.safetensors"
    for path in [final, companion_path(final)] if lora_format == "both" else [final]:
        if os.path.isdir(path):  # (a folder this user may not enter is said with its flag, by require_writable_folder)
            raise UserError(f"{path}: a folder has this name, where the run saves its LoRA at the end; move it away or "
                            f"choose another --output_name")
        output_target(path)
        refuse_a_writer_of(path, "--output_dir / --output_name")  # (a merge into it: its rename replaced the run's LoRA)
    output_target(Path(output_dir) / f"{name}-state", folder=True)
    _check_series_names_free(Path(output_dir), name)


def _check_series_names_free(out: Path, name: str) -> None:
    """No folder stands at a name of the run's epoch or step LoRAs, and no file at one of its states' (NAME-step00000008
    .safetensors made a folder): found at that save, it stopped the run there and the steps since the last save were lost
    (fuzz_aq 2)."""
    loras, states = lora_file_names(name), re.compile(rf"{re.escape(name)}{CHECKPOINT_SUFFIX}-state")
    try:
        entries = list(out.iterdir()) if os.path.isdir(out) else []
    except OSError:
        return  # (output_target has said what the folder cannot be)
    for path in sorted(entries):
        if loras.fullmatch(path.name) and path.is_dir():
            raise UserError(f"{path}: a folder has this name, where the run saves one of its LoRAs; move it away or choose "
                            f"another --output_name")
        if states.fullmatch(path.name) and (path.exists() or path.is_symlink()) and not path.is_dir():
            raise UserError(f"{path}: a file has this name, where the run saves one of its states (a folder); move it away or "
                            f"choose another --output_name")



def remove_run_leftovers(out: Path, name: str) -> None:
    """What a killed run of --output_name `name` left in `out`, never complete, so never worth keeping: temporary files
    of the names it writes (only where their writer is gone: another command, a merge or post-hoc EMA, may be writing
    its own output into this folder now), half-written states, and replaced states' copies. Removed by the next run of
    that name, whether it trains or finds nothing left to train (a resume of a finished run kept them: fuzz_ae 9)."""
    escaped = re.escape(name)
    states = re.compile(rf"{escaped}{CHECKPOINT_SUFFIX}?-state")
    written = re.compile(rf"{lora_file_names(name).pattern}|{escaped}-loss\.(?:csv|png)"
                         rf"|{states.pattern}(?:\.old|\.incomplete)?")  # (states being deleted: files.remove_folder)
    remove_leftover_temp_files(out, written.fullmatch, folders=True)
    for path in sorted(out.glob(f"{glob.escape(name)}*-state.*")):
        stem, _, suffix = path.name.rpartition(".")
        if not states.fullmatch(stem) or suffix not in ("incomplete", "old") or path.is_symlink() or not path.is_dir():
            continue
        if suffix == "old" and not path.with_suffix("").is_dir():
            continue  # a kill between the renames left only this copy (see state.newest_state)
        remove_folder(path)
        logger.info("removed %s (left by an interrupted run)", path)
    remove_leftover_temp_files(out / "sample", lambda target: target.startswith(name + "_"))  # samples, grids


def session_id(run: dict | None) -> int:
    """The run's ss_session_id: drawn from when it began (the run identity's session_started, which a resumed run keeps),
    so a run stopped and resumed is one session, as lora_post_hoc_ema takes it (it was drawn at each start, and the
    tool then ordered one run's files by modification time and averaged its last step twice: fuzz_ax 1); not from the
    seeded generator, so two runs of one seed are two sessions."""
    started = (run or {}).get("session_started")
    if not isinstance(started, (int, float)):
        return secrets.randbelow(2**32)
    return int.from_bytes(hashlib.sha256(repr(float(started)).encode()).digest()[:4], "big")


class CheckpointSaver:
    def __init__(self, args, accelerator, network, config, data, dataset_config, *, optimizer_name: str, batches_per_epoch: int,
                 max_train_steps: int, num_epochs: int, scheduler, optimizer, run: dict | None = None, hub=None):
        """batches_per_epoch: this process's share; max_train_steps: the steps the run makes (from --max_train_epochs
        when given). Both are recorded as musubi-tuner records them (ss_num_batches_per_epoch, ss_max_train_steps)."""
        self.args, self.accelerator, self.network = args, accelerator, network
        self.optimizer, self.scheduler = optimizer, scheduler
        self.run = run  # recorded in every state, checked on resume (state.check_resumable)
        self.resumed_from: Path | None = None  # the state this run continues (_remove_up_to, last_good)
        self.hub = hub if accelerator.is_main_process else None  # training.hub.HubUploader: --huggingface_repo_id
        self.out = Path(args.output_dir)
        self.name = args.output_name
        self.num_epochs = num_epochs
        self.batches_per_epoch = batches_per_epoch
        self.save_dtype = str_to_dtype(args.save_precision, torch.float32, "--save_precision")
        self.last_saved: Path | None = None  # the newest LoRA this run saved (always finite and usable: see save)
        self.last_state: Path | None = None  # its state folder, if one was saved with it
        self.last_step: int | None = None  # the step it was saved at
        # (step, path) -> extra metadata for that file, called on every process before each save (validation's hook)
        self.before_save = None
        from musubi_tuner.training.loss_curve import LossHistory

        self.losses = LossHistory(self.out / f"{self.name}-loss.csv")
        if accelerator.is_main_process:
            remove_run_leftovers(self.out, self.name)
        started = time.time()
        self.spec = modelspec(args, started)
        self.metadata = training_metadata(
            args, config=config, network_info=lora_module_info(network), datasets=[d.metadata() for d in dataset_config.datasets],
            num_items=data.num_items, batches_per_epoch=batches_per_epoch, max_train_steps=max_train_steps, num_epochs=num_epochs,
            optimizer_name=optimizer_name, training_started=started, session_id=session_id(run))
        if accelerator.is_main_process:
            self._check_free_space()

    def _check_free_space(self) -> None:
        """A save needs room for the LoRA (twice with its .comfyui copy) and, with states, the network and an optimizer's
        two moments in float32: checked now, not at the first save or the final one, hours in. (A probe file, which
        require_writable_folder writes, fits a nearly full disk.) A LoRA file is its tensors and its header: an entry per
        tensor (name, dtype, shape, offsets: under HEADER_BYTES_PER_TENSOR) and the run's metadata (flags, datasets,
        modules), with what each save adds to it (steps, losses, hashes: SAVE_METADATA_BYTES)."""
        tensors = self.network.state_dict()
        weights = sum(t.numel() for t in tensors.values())
        metadata = len(json.dumps({k: str(v) for k, v in {**self.metadata, **self.spec}.items()}).encode())
        header = sum(len(k) + HEADER_BYTES_PER_TENSOR for k in tensors) + metadata + SAVE_METADATA_BYTES
        files = 1 if self.args.lora_format in ("musubi", "comfyui") else 2
        lora = (weights * self.save_dtype.itemsize + header) * files
        state = 3 * 4 * weights if self.args.save_state or self.args.save_state_on_train_end else 0
        largest = max(lora // files, 2 * 4 * weights if state else 0)  # (the LoRA, or the optimizer's two moments)
        limit = _file_size_limit()
        if limit is not None and largest > limit:  # (a warning: the file-size limit is also how a test stands in for a disk
            # that fills mid-save; met at the first save, it came after an epoch's work: fuzz_w 7)
            logger.warning("this process may write files of at most %s (ulimit -f), and each save of this run writes one of "
                           "about %s: every save, the final one included, will fail; raise the limit (ulimit -f unlimited) "
                           "before training", _mb(limit), _mb(largest))
        free = shutil.disk_usage(self.out).free
        if free < lora + state:
            raise UserError(f"{self.out}: {free / 1e6:,.1f} MB free, and each save of this run writes about "
                            f"{(lora + state) / 1e6:,.1f} MB (the LoRA{' and its .comfyui copy' if files == 2 else ''}"
                            f"{', the training state' if state else ''}); free some space or choose another --output_dir")

    # -- names (musubi-tuner's)
    def epoch_name(self, epoch: int) -> str:
        return f"{self.name}-{epoch:06d}"

    def step_name(self, step: int) -> str:
        return f"{self.name}-step{step:08d}"

    # -- triggers
    def after_step(self, progress: TrainProgress) -> None:
        n = self.args.save_every_n_steps
        if not n or progress.global_step % n:
            return
        self.save(self.step_name(progress.global_step), progress, epoch=progress.epoch + 1, with_state=self.args.save_state)
        self.prune_steps(progress.global_step)

    def after_epoch(self, progress: TrainProgress, epoch: int) -> None:
        n = self.args.save_every_n_epochs
        if not n or epoch % n or epoch >= self.num_epochs:
            return
        self.save(self.epoch_name(epoch), progress, epoch=epoch, with_state=self.args.save_state)
        self._prune_epochs(epoch)

    def final(self, progress: TrainProgress) -> Path:
        # the epochs begun: a run stopped by --max_train_steps within its first epoch recorded ss_epoch 0, where its step
        # save at the same step records 1 (fuzz_am 2)
        epoch = progress.epoch + (1 if progress.batch_in_epoch else 0)
        path = self.save(self.name, progress, epoch=epoch, with_state=self.args.save_state or self.args.save_state_on_train_end, last=True)
        if self.hub is not None:
            self.hub.finish()
        return path

    @property
    def last_good(self) -> str:
        """The newest checkpoint this run saved, with its state, or else the one it resumed from, in words (for a run
        stopped by a bad update; a resumed run said "none yet" with its checkpoint on disk: fuzz_ar 10)."""
        if self.last_saved is not None:
            return f"{self.last_saved}" + (f" (state {self.last_state})" if self.last_state else "")
        if self.resumed_from is not None:
            lora = self._resumed_lora()
            return f"{lora} (state {self.resumed_from}, which this run resumed from)" if lora else \
                f"the state this run resumed from, {self.resumed_from}"
        return "none yet"

    @property
    def lower_rate(self) -> str:
        """How to lower the learning rate from the last good checkpoint: --resume continues at the state's own rate (it
        said so, and diverged again at the same step: fuzz_ar 10); a new run from its LoRA takes the new one."""
        lora = self.last_saved or self._resumed_lora()
        return "Lower --learning_rate" + (f" (from that checkpoint, in a new run with --network_weights {lora}: --resume "
                                          "continues at its state's rate)" if lora else "")

    def _say_fp16_rounding(self, path: Path, weights: dict[str, torch.Tensor]) -> None:
        """Said once: --save_precision fp16 saves values below its smallest (6e-8) as 0, and a small learning rate's LoRA
        holds many: at 1e-8, 99% of the up weights were written as 0, without a word (fuzz_bb 6)."""
        exact = self.network.state_dict_for_saving(None)
        worst, key = 0.0, None
        for name, saved in weights.items():
            if saved.is_floating_point() and name in exact and (norm := float(exact[name].float().norm())) > 0:
                error = float((saved.float() - exact[name].float()).norm()) / norm
                if error > worst:
                    worst, key = error, name
        if worst > FP16_ROUNDING_SAID:
            self._said_fp16_rounding = True
            logger.warning("%s: --save_precision fp16 changes %s by %.0f%% (values below fp16's smallest, 6e-08, are saved as 0, "
                           "as a small learning rate's are); save in bf16 or float to keep them", path, key, 100 * worst)

    @property
    def or_bf16(self) -> str:
        """", or use bf16 instead of fp16" where the run computes in fp16 (--mixed_precision fp16, --full_fp16), whose
        overflow bf16 avoids; nothing otherwise (a bf16 or float32 run was told it too: fuzz_bb 7)."""
        args = getattr(self, "args", None)
        fp16 = args is not None and (getattr(args, "mixed_precision", None) == "fp16" or bool(getattr(args, "full_fp16", False)))
        return ", or use bf16 instead of fp16" if fp16 else ""

    def _resumed_lora(self) -> Path | None:
        if self.resumed_from is None:
            return None
        lora = self.resumed_from.with_name(self.resumed_from.name.removesuffix("-state") + ".safetensors")
        return lora if lora.is_file() else None

    # -- writing
    def _before_save(self, step: int, path: Path) -> dict[str, str]:
        """The extra metadata of `path` (its validation loss). Validation that fails at a save (a validation cache deleted
        meanwhile, its memory) costs that metadata, not the save: the final save of a whole run was lost (fuzz_ak 1). In
        a run of one process only: with several, the others may be inside validation's collectives, and the failing
        process stops the run as before (its peers say it stopped)."""
        if self.before_save is None:
            return {}
        try:
            return self.before_save(step, path)
        except (UserError, torch.OutOfMemoryError) as e:
            if self.accelerator.num_processes > 1:
                raise
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("%s: saved without its validation loss: validation at step %d failed (%s)", path, step,
                           str(e).splitlines()[0][:300])
            return {}

    def save(self, stem: str, progress: TrainProgress, *, epoch: int, with_state: bool, last: bool = False) -> Path:
        """Write the LoRA file(s) `stem`, and its state with `with_state`; upload them with --huggingface_repo_id (the
        `last` save synchronously)."""
        acc = self.accelerator
        path = self.out / f"{stem}.safetensors"
        from musubi_tuner.training.loop import diverged_update, first_non_finite

        bad = first_non_finite(self.network)
        if bad is not None:  # never a NaN LoRA on disk, and never one named as the last good checkpoint
            raise UserError(f"{path}: not saved: {bad} holds NaN/inf values at step {progress.global_step}. Last good "
                            f"checkpoint: {self.last_good}. {self.lower_rate}{self.or_bf16}.")
        too_large = diverged_update(self.network)
        if too_large is not None:  # nor one that every reader refuses (lora_reader.DIVERGED_UPDATE)
            raise UserError(f"{path}: not saved at step {progress.global_step}: {too_large}. Last good checkpoint: "
                            f"{self.last_good}. {self.lower_rate}.")
        schedule_free = hasattr(self.optimizer, "eval") and type(self.optimizer).__name__.endswith("ScheduleFree")
        if schedule_free:
            self.optimizer.eval()  # schedule-free: save the averaged weights
        weights = self.network.state_dict_for_saving(self.save_dtype) if hasattr(self.network, "state_dict_for_saving") else None
        overflow = next((k for k, t in (weights or {}).items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if overflow is not None:  # finite in the network's dtype, beyond the save precision's range (fp16: 65504)
            largest = float(self.network.state_dict()[overflow].abs().max())
            raise UserError(f"{path}: not saved: {overflow} does not fit --save_precision {self.args.save_precision} at step "
                            f"{progress.global_step} (its largest value is {largest:.3g}). Last good checkpoint: "
                            f"{self.last_good}. {self.lower_rate}, or save in bf16 or float.")
        if weights is not None and self.save_dtype == torch.float16 and acc.is_main_process and not getattr(self, "_said_fp16_rounding", False):
            self._say_fp16_rounding(path, weights)
        extra = self._before_save(progress.global_step, path)
        if acc.is_main_process:
            if weights is not None:
                from musubi_tuner.files import atomic_write, save_safetensors
                from musubi_tuner.networks.lora_files import lora_outputs

                outputs = list(lora_outputs(weights, path, self.args.lora_format))  # the kohya file and/or its ComfyUI copy
                # every file of the pair is written whole before either replaces its previous version: a full disk keeps
                # the previous pair, and a run killed while writing leaves it too (only the two renames, back to back,
                # could be split by a kill); a rename that fails undoes the other
                try:
                    with replaced_together([out.path for out in outputs]), contextlib.ExitStack() as pair:
                        for out in outputs:
                            meta = finish_metadata({**self.metadata, **extra}, out.tensors, steps=progress.global_step,
                                                   epoch=epoch, spec=self.spec, naming=out.naming, companion=out.companion)
                            if self.hub is not None:
                                self.hub.wait_for(out.path)  # an upload of an older file of this name still reading it
                            # a merge writing into this name (started before the run, into a step's name: its rename
                            # replaced the checkpoint, both said saved: fuzz_at 1) is named; the LoRA is rescued
                            refuse_a_writer_of(out.path, "--output_dir / --output_name")
                            staged = pair.enter_context(atomic_write(out.path))
                            save_safetensors(out.tensors, staged, metadata={k: str(v) for k, v in meta.items()}, staged=True)
                except UserError as e:  # every save's LoRA is rescued, not only the final one: a periodic save on the
                    # last step failed, and the finished run's training was lost (fuzz_aq 6)
                    kohya = outputs[0]  # (alone: its companion is not beside it)
                    meta = finish_metadata({**self.metadata, **extra}, kohya.tensors, steps=progress.global_step, epoch=epoch,
                                           spec=self.spec, naming=kohya.naming, companion=None)
                    raise self._rescued(kohya.tensors, meta, progress, e) from None
                if self.hub is not None:
                    for out in outputs:
                        self.hub.upload(out.path, sync=last)
            else:
                self.network.save_weights(str(path), self.save_dtype, {**self.metadata, **extra})
            self.losses.save(self.out / f"{self.name}-loss.png")
            logger.info("saved %s", path)
        if with_state:
            state_dir = self.out / f"{stem}-state"
            if self.hub is not None:
                self.hub.wait_for(state_dir)
            save_state(state_dir, network_state={k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
                       optimizer=self.optimizer, scheduler=self.scheduler, scaler=acc.scaler, progress=progress,
                       process_index=acc.process_index, is_main=acc.is_main_process, wait=patient_wait, run=self.run)
            if self.hub is not None and self.args.save_state_to_huggingface:
                self.hub.upload(state_dir, sync=last)
        if schedule_free:
            self.optimizer.train()
        self.last_saved, self.last_step = path, progress.global_step
        self.last_state = self.out / f"{stem}-state" if with_state else None
        return path

    def _rescued(self, tensors: dict, meta: dict, progress: TrainProgress, error: UserError) -> UserError:
        """A LoRA could not be written where it belongs (a full disk, a quota): the run's training is then in memory
        only, and without a state it was lost. It is written to the temporary folder instead, else to the home
        folder, and the error says where (`error` alone when neither takes it)."""
        import tempfile

        from musubi_tuner.files import atomic_write, save_safetensors

        for folder in (Path(tempfile.gettempdir()), Path.home()):
            # a name no file has (an earlier run's rescue of the same name and step, another user's in a shared /tmp,
            # was replaced, or refused the write and the LoRA was lost): numbered past those there, and taken (created
            # empty, exclusively) before it is written: two runs rescuing at once chose one name (fuzz_aq 13)
            stem = f"{self.name}-rescued-step{progress.global_step:08d}"
            rescue = next((p for p in (folder / f"{stem}{f'-{n}' if n else ''}.safetensors" for n in range(1000))
                           if _taken(p)), None)
            if rescue is None:
                continue
            try:
                with atomic_write(rescue) as staged:
                    save_safetensors(tensors, staged, metadata={k: str(v) for k, v in meta.items()}, staged=True)
            except (UserError, OSError, RuntimeError):
                rescue.unlink(missing_ok=True)
                continue
            logger.info("saved %s", rescue)
            return UserError(f"{error}. The trained LoRA is saved as {rescue} instead: move it where it belongs")
        return error

    @property
    def resumed_here(self) -> bool:
        """Whether the run continues a state of its own --output_dir. A state of another folder starts this folder's
        series: what the folder holds of the name is an earlier run's, said, and not pruned as this run's (it was, and
        the loss curve spliced onto that run's: fuzz_ax 3)."""
        from musubi_tuner.training.state import state_home

        if self.resumed_from is None:
            return False
        state = state_home(self.resumed_from)  # (a checkpoint of another folder linked in is that folder's: fuzz_az 1)
        try:  # (the same folder spelled through a link is the same folder: fuzz_ay 2)
            return os.path.samefile(state.parent, self.out)
        except OSError:
            return os.path.abspath(state.parent) == os.path.abspath(self.out)

    def take_history_of(self, step: int) -> None:
        """The loss history of the run the state of another folder it resumed from belongs to (its NAME-loss.csv there),
        up to `step`: the curve this run continues."""
        from musubi_tuner.training.loss_curve import LossHistory
        from musubi_tuner.training.state import state_home, state_run_name

        state = state_home(self.resumed_from)  # (fuzz_az 1)
        origin = LossHistory(state.parent / f"{state_run_name(state) or self.name}-loss.csv", say=False)
        self.losses.train, self.losses.validation = origin.train, origin.validation
        self.losses.truncate(step)

    def keep_the_end_it_continues(self, progress: TrainProgress) -> None:
        """A finished run trained on (its final LoRA is of the step this run resumes at) would see that LoRA replaced by
        this run's final one, and its series lack the save an uninterrupted run makes there (musubi-tuner replaces it
        without a word: fuzz_ax 5). It is kept under the name of that epoch or step save when the flags make one there,
        and said to be replaced otherwise."""
        from musubi_tuner.files import atomic_write, read_safetensors_header
        from musubi_tuner.networks.lora_files import companion_path

        final = self.out / f"{self.name}.safetensors"
        if not self.accelerator.is_main_process or not self.resumed_here or not final.is_file():
            return
        a, step = self.args, progress.global_step
        if (progress.batch_in_epoch >= self.batches_per_epoch and a.save_every_n_epochs
                and (progress.epoch + 1) % a.save_every_n_epochs == 0):
            return  # the epoch's end, which this run makes first, saves it (fuzz_az 3)
        name = (self.epoch_name(progress.epoch) if a.save_every_n_epochs and progress.epoch and not progress.batch_in_epoch
                and progress.epoch % a.save_every_n_epochs == 0 else
                self.step_name(step) if a.save_every_n_steps and step % a.save_every_n_steps == 0 else None)
        try:
            ended = read_safetensors_header(final)[1]
            if ended.get("ss_steps") != str(step):
                return
            # its own save of that step is there, whatever the flags now (the step saves' interval divided the last step:
            # fuzz_ay 1, fuzz_az 3)
            for other in {name, self.step_name(step), self.epoch_name(progress.epoch) if progress.epoch else None} - {None}:
                path = self.out / f"{other}.safetensors"
                kept = read_safetensors_header(path)[1] if path.exists() else {}
                if (kept.get("ss_steps"), kept.get("ss_session_id")) == (str(step), ended.get("ss_session_id")):
                    return
        except UserError:
            return
        if name is None or (self.out / f"{name}.safetensors").exists():
            logger.warning("%s, the final LoRA of the run this one continues (step %d), will be replaced by this run's final "
                           "LoRA; copy it now to keep it", final, step)
            return
        for source in (final, companion_path(final)):
            if source.is_file():
                kept = source.with_name(name + source.name[len(self.name):])
                with atomic_write(kept) as tmp:
                    shutil.copyfile(source, tmp)
        logger.info("%s, the final LoRA of the run this one continues (step %d), is kept as %s.safetensors, the save an "
                    "uninterrupted run makes there; this run's final LoRA replaces it", final, step, name)

    def warn_of_an_earlier_run(self) -> None:
        """A fresh run (no --resume, or one of another folder's state) into a folder that holds an earlier run's LoRAs or
        states of this --output_name replaces those it writes under the same names and leaves the others beside them
        (musubi-tuner does so silently): say so, since post-hoc EMA or --resume auto would later mix the two runs."""
        from musubi_tuner.training.state import complete_states

        own = lora_file_names(self.name)
        found = sorted(p.name for p in self.out.glob("*.safetensors") if own.fullmatch(p.name))
        found += [p.name for p in complete_states(self.out, self.name)]
        if found:
            how = "starts afresh," if self.resumed_from is None else f"continues {self.resumed_from}, of another folder,"
            logger.warning("%s holds %d files of an earlier run named %s (%s%s); this run %s replaces those it writes "
                           "under the same names and leaves the others. To continue that run, use --resume auto; to keep "
                           "both, another --output_name", self.out, len(found), self.name, ", ".join(found[:3]),
                           ", ..." if len(found) > 3 else "", how)

    # -- keeping the last N (musubi-tuner's arithmetic for which save leaves the window)
    def _prune_epochs(self, epoch: int) -> None:
        a, n = self.args, self.args.save_every_n_epochs
        if a.save_last_n_epochs:
            self._remove_up_to("epoch", epoch - n * a.save_last_n_epochs, ".safetensors")
        keep_states = a.save_last_n_epochs_state or a.save_last_n_epochs
        if keep_states and a.save_state:
            self._remove_up_to("epoch", epoch - n * keep_states, "-state")

    def prune_steps(self, step: int) -> None:
        a, n = self.args, self.args.save_every_n_steps
        if not n or step % n:  # only a step that saved moves the window
            return
        if a.save_last_n_steps:
            self._remove_up_to("step", (step - a.save_last_n_steps - 1) // n * n, ".safetensors")
        keep_states = a.save_last_n_steps_state or a.save_last_n_steps
        if keep_states and a.save_state:
            self._remove_up_to("step", (step - keep_states - 1) // n * n, "-state")

    def _remove_up_to(self, kind: str, last: int, suffix: str) -> None:
        """Remove the step (or epoch) save numbered `last`, which just left the window, as musubi-tuner does; in a
        resumed run every one numbered up to it, as a run killed between a save and its pruning kept files for ever. A
        fresh run removes no other: the files of an earlier run of the name, which it says it leaves, were removed up to
        the window's edge (fuzz_am 4)."""
        if last <= 0:
            return
        number = r"step(\d{8})" if kind == "step" else r"(\d{6})"
        saved = re.compile(rf"{re.escape(self.name)}-{number}(\.comfyui)?{re.escape(suffix)}")  # a companion alone counts too
        for path in sorted(self.out.glob(f"{glob.escape(self.name)}-*{suffix}")):
            match = saved.fullmatch(path.name)
            if match and (int(match.group(1)) <= last if self.resumed_here else int(match.group(1)) == last):
                self._remove(path)

    def _remove(self, path: Path) -> None:
        if not self.accelerator.is_main_process:
            return
        from musubi_tuner.networks.lora_files import companion_path

        # a state's .old copy goes first: left alone, it would be taken for the state (see state.complete_states)
        pair = [path, companion_path(path)] if path.suffix == ".safetensors" else [path.with_name(path.name + ".old"), path]
        for p in pair:
            if self.hub is not None:
                self.hub.wait_for(p)
            if p.exists():
                remove_folder(p) if p.is_dir() else p.unlink()  # a kill while deleting a state leaves no state without its files
                logger.info("removed %s (keeping the last ones)", p)


def _file_size_limit() -> int | None:
    """The largest file this process may write (RLIMIT_FSIZE), or None when unlimited or not told."""
    try:
        import resource
    except ImportError:  # (Windows)
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _taken(path: Path) -> bool:
    """Whether `path` was free and is now this process's (created empty, exclusively: no other process takes it too)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except OSError:
        return False
