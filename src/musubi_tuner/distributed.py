"""How the processes of a run share the work, on torch.distributed (whatever started them: accelerate launch, torchrun).

world = replicas x context parallel. Processes r*N .. r*N + N-1 form one context-parallel group of N
(neighbours in rank order: on one machine, where the all-to-alls of sequence parallelism are cheapest);
they share every sample's tokens. Training's replicas are data parallel (each takes its own batches);
generation's are CFG branches (one runs the negative prompt, the other the positive one).

Gradients of the network (not wrapped in DDP: its modules run inside the frozen DiT) are summed over all
processes in a few flat buckets and divided by the number of replicas: within a group each process holds
part of every sample's gradient (see hunyuan/sequence_parallel.py), across replicas the samples differ.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from musubi_tuner.errors import SharedError, Terminated, UserError, exit_without_finalising, launched, under_a_launcher
from musubi_tuner.hunyuan.sequence_parallel import SequenceParallel

logger = logging.getLogger(__name__)

BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket


@dataclass
class Layout:
    rank: int
    world: int
    context_parallel: int
    sequence: SequenceParallel | None = None  # this process's context-parallel group (None without one)
    replica_group: dist.ProcessGroup | None = None  # the processes of this one's group rank in every replica

    @property
    def replicas(self) -> int:
        return self.world // self.context_parallel

    @property
    def replica(self) -> int:
        """Which replica (data-parallel shard, or CFG branch) this process belongs to."""
        return self.rank // self.context_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_layout(context_parallel: int, flag: str = "--context_parallel") -> Layout:
    """The groups of this run; every process must call it (creating a group is a collective)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    n = context_parallel
    check_training_processes(world, n, flag)
    layout = Layout(rank, world, n)
    if n > 1:
        for start in range(0, world, n):
            group = dist.new_group(list(range(start, start + n)))
            if start <= rank < start + n:
                layout.sequence = SequenceParallel(group, n, rank - start)
    if world // n > 1:
        for first in range(n):
            group = dist.new_group(list(range(first, world, n)))
            if rank % n == first:
                layout.replica_group = group
    return layout


def check_training_processes(world: int, context_parallel: int, flag: str = "--context_parallel") -> None:
    """The processes started fit the groups of `context_parallel` (a --dry_run checks it from WORLD_SIZE, without joining)."""
    n = context_parallel
    if world % n:
        started = f"{world} processes were started" if world > 1 else "one process was started"
        raise SharedError(f"{flag} {n} shares each sample over groups of {n} processes, and {started}; start a multiple of {n} "
                          f"(accelerate launch --multi_gpu --num_processes {n}, or torchrun --nproc_per_node {n})")


def describe(layout: Layout, training: bool = True) -> str:
    backend = dist.get_backend() if layout.world > 1 else "none"
    head = f"{layout.world} processes ({backend} backend): "
    if training:
        return head + f"{layout.replicas} data parallel x {layout.context_parallel} context parallel"
    return head + f"context parallel over {layout.context_parallel}" + (
        ", the negative and the positive prompt on separate groups (CFG-parallel)" if layout.replicas == 2 else "")


@dataclass
class CfgBranches:
    """Real CFG over two replicas: replica 0 runs the negative prompt, replica 1 the positive one; after every DiT
    call the two swap predictions (one all-gather between the processes of the same group rank)."""

    group: dist.ProcessGroup
    negative: bool

    @classmethod
    def of(cls, layout: Layout) -> "CfgBranches":
        if layout.replicas != 2:
            raise ValueError("CFG-parallel needs exactly two replicas")
        return cls(layout.replica_group, negative=layout.replica == 0)

    def exchange(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prediction -> (negative, positive)."""
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v.contiguous(), group=self.group)
        return parts[0], parts[1]


# ------------------------------------------------------------------------------------------- gradients


@dataclass
class GradientReducer:
    """Sum the gradients of `params` over every process, then divide by `divide_by`: one all-reduce per bucket of
    up to `bucket_bytes` (consecutive parameters of one dtype and device), not one per tensor.

    A missing gradient (a module dropped by module dropout on one process only) counts as zero, so the
    buckets always pair up across processes."""

    params: list[torch.nn.Parameter]
    divide_by: int
    bucket_bytes: int = BUCKET_BYTES
    buckets: list[list[torch.nn.Parameter]] = field(default_factory=list)

    def __post_init__(self):
        self.params = [p for p in self.params if p.requires_grad]
        size = 0
        for p in self.params:
            nbytes = p.numel() * p.element_size()
            last = self.buckets[-1][-1] if self.buckets else None
            if last is None or size + nbytes > self.bucket_bytes or (last.dtype, last.device) != (p.dtype, p.device):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def describe(self) -> str:
        return (f"gradients: {len(self.params)} tensors ({self.nbytes / 2**20:.1f} MiB) reduced in {len(self.buckets)} "
                f"all-reduce{'s' if len(self.buckets) != 1 else ''} per step (buckets of up to {self.bucket_bytes / 2**20:g} MiB)")

    def reduce(self) -> None:
        for bucket in self.buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            if self.divide_by != 1:
                flat.div_(self.divide_by)
            for p, piece in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = piece.view_as(p)


# ------------------------------------------------------------------------------------------- broadcast


def broadcast_tensors(tensors: dict[str, torch.Tensor | None] | None, device: torch.device, src: int = 0) -> dict[str, torch.Tensor | None]:
    """The dict of tensors (or None values) process `src` holds, on every process, on `device` (the others pass None):
    shapes and dtypes travel first as one small object, then each tensor in one broadcast."""
    rank = dist.get_rank()
    header = [None if rank != src else {k: None if v is None else (tuple(v.shape), v.dtype) for k, v in tensors.items()}]
    dist.broadcast_object_list(header, src=src, device=device if device.type == "cuda" else None)
    out = {}
    for key, spec in header[0].items():
        if spec is None:
            out[key] = None
            continue
        t = tensors[key].to(device).contiguous() if rank == src else torch.empty(spec[0], dtype=spec[1], device=device)
        dist.broadcast(t, src=src)
        out[key] = t
    return out


def broadcast_value(value, src: int = 0):
    """A small picklable value (a seed, a flag) from process `src` to all."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def before_joining() -> None:
    """What a process started as one of several (WORLD_SIZE > 1) checks and sets before it joins the group.

    MASTER_ADDR must name a host: one that does not resolve made training wait twice --ddp_timeout and blame the other
    processes, and generation retry silently for 30 minutes. A process of a launcher (torchrun, accelerate launch)
    stops with it: a launcher killed with SIGKILL (the OOM killer) left its processes training on, holding the GPUs
    and the output folder, and writing a final LoRA of a run its user thought gone."""
    import os
    import signal
    import socket
    import sys

    rank, world = launched()
    if world <= 1:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # (RANK and WORLD_SIZE left in a shell or a job script: a traceback from torch's rendezvous: fuzz_ah 4)
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} are set in the environment, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: unset RANK and WORLD_SIZE to run this command alone, or "
                        "start its processes with accelerate launch or torchrun")
    if not under_a_launcher():  # started by hand (or by variables left over): the
        # rendezvous waits for every process, without a word (a leftover WORLD_SIZE=2 waited 30 minutes in silence)
        logger.info("process %d of %d (RANK and WORLD_SIZE from the environment, no launcher): waiting for the others at %s:%s",
                    rank, world, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    address = os.environ.get("MASTER_ADDR")
    if address:
        try:
            socket.getaddrinfo(address, None)
        except (OSError, UnicodeError) as e:
            raise UserError(f"MASTER_ADDR {address}: cannot resolve this host name ({getattr(e, 'strerror', None) or e}); give "
                            "the address of process 0's machine (torchrun --master_addr, accelerate launch --main_process_ip)") from None
    if sys.platform == "linux" and os.environ.get("TORCHELASTIC_RUN_ID"):  # (not a process a shell or a scheduler started)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the launcher is gone
        if os.getppid() == 1:  # it was gone before that
            os.kill(os.getpid(), signal.SIGTERM)


def join_launched_group(device: torch.device, timeout_minutes: int | None = None) -> torch.device:
    """Join the process group of a launcher (torchrun, accelerate launch: WORLD_SIZE > 1 in the environment), whose
    collectives wait `timeout_minutes` (--ddp_timeout; PyTorch's default without: generation waited 30 minutes in
    silence on a stopped process, with no flag to shorten it: fuzz_ae 8); returns this process's device (cuda:LOCAL_RANK
    when `device` is cuda without an index)."""
    import datetime
    import os

    if launched()[1] == 1:
        return device
    before_joining()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = {"timeout": datetime.timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
        while_stoppable(lambda: dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout))
    after_joining()
    return device


def while_stoppable(call):
    """call() (the rendezvous of a process group, which waits for every process) run in a thread of its own while this
    one waits in slices, so that Ctrl-C and SIGTERM are taken at once: blocked in the rendezvous, a process started by
    hand could only be killed, and one of a launcher whose other process failed before joining was killed 30 s later
    without its line (fuzz_bd 2, fuzz_ah 4c). Stopped, the thread is left waiting: the command exits without
    finalisation (errors.exit_without_finalising)."""
    import threading

    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # (handed to the waiting thread, which raises it)
            outcome["error"] = e

    thread = threading.Thread(target=run, name="process group rendezvous", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except BaseException:
        exit_without_finalising()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def after_joining() -> None:
    """What every process of a run does once it has joined the group, together: the command lines compared, and the
    group of the patient waits made now (made at the first wait, a process 0 that died before it left the others in
    its rendezvous, where no signal reaches them)."""
    check_same_command_line()
    _patient()


def check_same_command_line(argv: list[str] | None = None) -> None:
    """Every process of a run must have been given the same command line (a launcher gives each the same): one whose
    flags differ (a wrapper that edits them, a shell loop) would compute another thing and mix it into the result,
    as a video sampled on two step schedules."""
    import sys

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    import os

    # as bytes: a process under another locale (C, Latin-1) reads the same bytes of a non-ASCII path as other text, and
    # the same command line was refused as another (fuzz_bd 3)
    mine = [os.fsencode(a) for a in (sys.argv[1:] if argv is None else argv) if not a.startswith(("--local_rank", "--local-rank"))]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    everyone = [[a.decode("utf-8", "backslashreplace") if isinstance(a, bytes) else a for a in args] for args in everyone]
    first = everyone[0]
    for process, other in enumerate(everyone):
        if other != first:
            at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), min(len(first), len(other)))
            flag = next((first[i] for i in range(min(at, len(first) - 1), -1, -1) if first[i].startswith("--")), "")
            shown = lambda args: " ".join(args[max(0, at - 1):at + 2]) or "(nothing)"  # noqa: E731
            raise SharedError(f"process {process} was started with another command line than process 0 (near {flag or 'the start'}: "
                              f"{shown(other)!r} vs {shown(first)!r}); give every process of a run the same flags")


def check_same_inputs(files: dict[str, str | None], extra: dict[str, str] | None = None, explain=None) -> None:
    """Every process of a run reads the same inputs: `files` maps how the user names each (a flag and its value) to its
    path (None: not given), `extra` other inputs to a digest of them here (a dataset's item list).

    A run over several machines reads each machine's copy of every file. One stale or partial copy was mixed into the
    result without a word: a video from two LoRAs, a LoRA trained on two item lists (each process shards its own: items
    trained twice or not at all), or a run whose process with fewer batches finished first and saved the final LoRA of
    a run that failed. `explain(what)`, called on every process at a difference in `extra`, may say more (a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from musubi_tuner.files import content_digest

    mine = {what: content_digest(path) for what, path in files.items() if path} | (extra or {})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for what, digest in everyone[0].items():
        other = next((p for p, theirs in enumerate(everyone) if theirs.get(what) != digest), None)
        if other is not None:
            more = explain(what) if explain and what in (extra or {}) else ""
            raise SharedError(f"{what} differs between process 0 and process {other} (each reads its own machine's copy"
                              f"{'; ' + more if more else ''}); give every process the same files")


PATIENT_HOURS = 24  # the wait for work only some processes do: far past any sample or save, short of forever
_patient_group = None
_waits_abandoned = False  # a stop came during a patient wait: its thread never ends


def patient_wait() -> None:
    """A barrier for waits on work only some processes do (process 0 sampling, saving, uploading): outside the collective
    timeout, which is for a process that hangs. A sample longer than --ddp_timeout (30 minutes with gloo, 10 with NCCL:
    one 720p sample takes 18 on an H100) killed a healthy run as 'stuck'. A process that dies still ends the wait at
    once (its connection closes). Every process must call it at the same points (the first makes the group)."""
    group = _patient()
    if group is None:
        return
    # waited for here, in Python, not inside the barrier: a launcher's SIGTERM (sent when another process failed) was
    # not handled there, the process was killed 30 s later without a word (a process 0 whose save failed, or whose
    # data-loader workers kept its connections open when it was killed: fuzz_ae 2)
    work = dist.barrier(group=group, async_op=True)
    try:
        while not work.is_completed():
            time.sleep(0.02)
    except Terminated as stop:
        global _waits_abandoned
        _waits_abandoned = True  # the barrier's thread waits on: destroying the groups, or exiting, would join it
        exit_without_finalising()
        raise Terminated(stop.signum, f"{stop.words} while waiting for another process's work (a process that failed "
                                      "says why above)") from None
    work.wait()


def _patient():
    """The group of patient_wait (every process makes it, at the same point), or None in a run of one process."""
    global _patient_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _patient_group is None:
        import datetime

        _patient_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=PATIENT_HOURS))
    return _patient_group


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def leave_group() -> None:
    global _patient_group
    if dist.is_available() and dist.is_initialized() and not _waits_abandoned:
        dist.destroy_process_group()
    _patient_group = None  # (it went with the others)


class WorkShare:
    """Independent jobs (VAE tiles) shared out over every process: job k runs on process k mod world, then each
    result is broadcast, so every process ends with all of them, in order."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def map(self, fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        mine = {k: fn(x) for k, x in enumerate(inputs) if k % self.world == self.rank}
        device = inputs[0].device if inputs else torch.device("cpu")
        return [broadcast_tensors({"out": mine[k]} if k in mine else None, device, src=k % self.world)["out"]
                for k in range(len(inputs))]


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class CollectiveLog:
    """Collectives a process issued: (name, bytes it sent)."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def count(self, name: str | None = None) -> int:
        return sum(1 for n, _ in self.calls if name is None or n == name)

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(b for n, b in self.calls if name is None or n == name)


@contextlib.contextmanager
def logging_collectives() -> Iterator[CollectiveLog]:
    """Record every all_reduce / all_to_all_single / all_gather / broadcast issued inside, with the bytes this process
    sends (ring all-reduce: 2 (N-1)/N of the tensor; all-to-all: (N-1)/N; all-gather: (N-1) x its part)."""
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_to_all_single", "all_gather", "broadcast")}

    def size(group) -> int:
        return dist.get_world_size(group)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        n = size(group)
        log.calls.append(("all_reduce", _nbytes(tensor) * 2 * (n - 1) // n))
        return originals["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    def all_to_all_single(output, input, *args, group=None, **kwargs):
        n = size(group)
        log.calls.append(("all_to_all", _nbytes(input) * (n - 1) // n))
        return originals["all_to_all_single"](output, input, *args, group=group, **kwargs)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        log.calls.append(("all_gather", _nbytes(tensor) * (size(group) - 1)))
        return originals["all_gather"](tensor_list, tensor, group=group, async_op=async_op)

    def broadcast(tensor, src=0, group=None, async_op=False, **kwargs):
        log.calls.append(("broadcast", _nbytes(tensor) if dist.get_rank() == src else 0))
        return originals["broadcast"](tensor, src=src, group=group, async_op=async_op, **kwargs)

    patched = {"all_reduce": all_reduce, "all_to_all_single": all_to_all_single, "all_gather": all_gather, "broadcast": broadcast}
    for name, fn in patched.items():
        setattr(dist, name, fn)
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

