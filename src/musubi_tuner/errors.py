"""User-facing errors: one line that names the culprit and the fix, no traceback unless asked for."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
from typing import Callable, Iterator, Sequence


class UserError(Exception):
    """A problem with something the user gave us (a file, a flag, a dataset entry).

    The message is printed as a single line without a traceback; it should name the file or flag,
    say what is wrong and, where there is one, the fix.
    """


class MachineLimit(UserError):
    """A limit of this process or machine met while reading an input (no memory, threads or file descriptors left):
    not the input's fault, so it stops the run instead of failing the item (`limit_met` makes one)."""


# errno values that are the machine's, not the file's: no thread could start, no memory, no file descriptor left
LIMIT_ERRNOS = (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE)


def limit_met(path, error: BaseException) -> MachineLimit | None:
    """A MachineLimit naming `path` and what ran out, when `error` (an OSError or a library's error with an errno) is one
    of the machine's limits; None otherwise."""
    if getattr(error, "errno", None) not in LIMIT_ERRNOS:
        return None
    reason = getattr(error, "strerror", None) or os.strerror(error.errno)
    return MachineLimit(f"{path}: cannot be read now ({reason}): a limit of this process or machine (memory, threads or open "
                        "files: ulimit -v, -u, -n), not the file")


class SharedError(UserError):
    """A UserError that every process of a multi-process run meets alike (a bad command line, a count that does not
    fit the model, a check made on values all processes share): process 0 prints it, the others only hand it to the
    launcher's summary, so the user reads it once, not once per process."""


def did_you_mean(word: str, candidates) -> str:
    """` (did you mean X?)` with the closest of `candidates` to a misspelt `word`, or nothing when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    if not close:
        return ""
    odd = [c for c in dict.fromkeys(str(word)) if not c.isascii() and c not in close[0]]
    if odd:  # a look-alike letter (a Cyrillic с for the Latin c): the suggestion read exactly as the word refused
        import unicodedata

        named = "; ".join(f"its {printable(c)} is U+{ord(c):04X} {unicodedata.name(c, 'with no name')}" for c in odd[:3])
        return f" (did you mean {close[0]}? {named})"
    return f" (did you mean {close[0]}?)"


@contextlib.contextmanager
def quieted(logger_name: str, level: int) -> Iterator[None]:
    """Within the block, the logger `logger_name` says only what reaches `level`: the logs of work done for a check or a
    plan (a network built on the meta device) are no news to the user, who reads them once from the real work."""
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("MUSUBI_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, memory_advice: str = "") -> None:
    """Run a command's main(); turn UserError into `error: ...` on stderr and exit status 2.

    Running out of GPU or host memory is one such line too, with `memory_advice`: the command's flags that need less.
    Output piped into a reader that stops early (`| head`) ends the command quietly, as it does C tools.
    stdout and stderr are side outputs: closed, or failing to write (a full disk under a log), they cost the command
    what it printed there, never its result or its exit status.
    """
    stop_cleanly_on_sigterm()  # first: a stop from here on is the command's one line, not a traceback or a silent end
    streams: list[LosableStdout] = []
    try:
        _run(main, argv, memory_advice, streams)
    finally:  # a SIGTERM once the command has ended (a launcher stopping its processes) ends it as the default does
        _default_sigterm()
        import atexit

        atexit.unregister(_nothing_left_to_stop)
        atexit.register(_nothing_left_to_stop)  # (registered last: run first of the exit handlers)
        for stdout in streams:
            if sys.stdout is stdout:
                sys.stdout = stdout.wrapped


def _require_a_file_size_limit() -> None:
    """A file-size limit of 0 (`ulimit -f 0`) lets the command write no file at all: torch's import ended in a traceback
    blaming the temporary folders ("No usable temporary directory found": its probe of 4 bytes failed) (fuzz_aq 10)."""
    try:
        import resource
    except ImportError:  # (Windows: no such limit)
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == 0:
        raise UserError("this process may write no file: its file-size limit is 0 (ulimit -f); raise it (ulimit -f "
                        "unlimited) and run the command again")


def _prepare(argv, streams: list) -> None:
    """What the command runs in, set up within _run's handling of a stop, as the command itself is."""
    _Held.raised = False  # (a command run in a process that ran one before, as the tests do)
    _Held.command = True
    try:
        os.getcwd()
    except FileNotFoundError:  # (torch's import then died as "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so",
        # which sent the user to reinstall torch: fuzz_ah 3)
        raise UserError("the current folder no longer exists (deleted, or replaced by a new one of its name): cd into a "
                        "folder that exists and run the command again") from None
    mask = os.umask(0o022)
    os.umask(mask)
    if mask & 0o700:  # (umask 0777: the cache folder was made unenterable, then its permissions blamed, and it stayed:
        # fuzz_ah 9a)
        raise UserError(f"the umask is {mask:04o}: the folders and files this command makes would be unusable by you (no "
                        f"{'/'.join(n for bit, n in ((0o400, 'read'), (0o200, 'write'), (0o100, 'enter')) if mask & bit)} "
                        "for their owner); set a usual one (umask 022) and run the command again")
    _require_a_file_size_limit()
    usable_standard_streams()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_launcher_variables()
    if one_of_a_launchers_others():  # one of a launcher's processes: process 0 says what every process meets alike, from the
        # command line on (what differs between them is refused, by name: distributed.check_same_inputs)
        logging.getLogger("musubi_tuner").setLevel(logging.ERROR)
    use_expandable_segments()
    _hold_stops_while_importing(HELD_IMPORTS)
    if not debug_requested(argv):
        # torch's C++ warnings (read as torch loads, which is later): a process whose peer or store went away printed a
        # 20-frame C++ backtrace before its one line (fuzz_ae 3); --debug keeps them
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        # bitsandbytes >= 0.50 logs at import that it could not fetch its 4-bit CPU kernels from the hub: the 8-bit
        # optimizers never use them, and a warning about remote code on every training start only alarms
        logging.getLogger("bitsandbytes.backends").setLevel(logging.ERROR)
        # torch logs its fake-tensor cache statistics at exit (at INFO, after an interrupted import among others)
        logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.WARNING)
    with stops_held():  # (run_cli puts it back)
        streams.append(LosableStdout(sys.stdout))
        sys.stdout = streams[-1]


# Compiled libraries whose start-up a stop must not land in, imported whole before a stop is raised (torch: a second;
# a command that needs none of them imports none). Raised inside numpy's, a stop came out as a RecursionError or an
# ImportError traceback, or was lost: torch took it for a numpy it could not load and the command ran on to its end
# (11 of 30 training runs stopped in their first half second). Raised inside torch's C++ start-up, it aborted the
# process (SIGABRT, "terminate called after throwing pybind11::error_already_set"; 1 in 30).
HELD_IMPORTS = ("torch", "numpy", "av", "safetensors", "tokenizers")


def _hold_stops_while_importing(names: Sequence[str]) -> None:
    if not any(isinstance(finder, _HeldImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HeldImports(names))


class _HeldImports:
    """A finder that finds nothing itself: it hands the real finders' spec of one of `names` (a top-level package) on
    with a loader that runs the package's import with stops held."""

    def __init__(self, names: Sequence[str]):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HeldLoader(spec.loader)
                return spec
        return None


class _HeldLoader:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # (get_filename, get_data, is_package, ...: importlib.util.find_spec's callers use them)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # (the package sees its own loader, as without us)
        with stops_held(importing=module.__name__):
            self.loader.exec_module(module)


def _nothing_left_to_stop() -> None:
    """At the exit of a command that has ended: Ctrl-C and a hang-up have nothing left to stop. Raised in an exit
    handler (data-loader workers being stopped, say), they printed "Exception ignored in atexit callback" and a
    traceback after the command's last line, and the studio took a run that had saved its LoRA for a stopped one.
    SIGTERM still ends the process at once."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGINT", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _dropped)  # (not SIG_IGN: see stop_cleanly_on_sigterm)


def _run(main, argv, memory_advice: str, streams: list) -> None:
    try:
        _run_main(main, argv, memory_advice, streams)
    except Exception:  # a traceback, a fault no check foresaw: the empty folders the command made go too, as after an error
        _remove_created_empty_folders()  # line (a damaged fp8 DiT's traceback left an empty --save_path behind: fuzz_y 12)
        raise
    finally:
        _Held.command = False


def _run_main(main, argv, memory_advice: str, streams: list) -> None:
    try:
        _prepare(argv, streams)
        main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's shutdown
    except UserError as e:
        if debug_requested(argv):
            raise
        _fail(without_worker_traceback(str(e), type(e).__name__), shared=isinstance(e, SharedError))
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "can't start new thread" in str(e) and not debug_requested(argv):
            exit_without_finalising()  # (the data loader's half-started workers and threads: the exit hung until killed)
            _fail(_no_new_task(e))
        message = out_of_memory(e)
        if message is not None and not debug_requested(argv):
            _fail(f"{message}{'; ' + memory_advice if memory_advice else ''} (--debug shows where)")
        message = worker_ended(e)
        if message is not None and not debug_requested(argv):
            _fail(message)
        message = lost_peer(e)
        if message is None or debug_requested(argv):
            raise
        _fail(f"{message} (--debug shows where)", about_another=True)
    except KeyboardInterrupt as e:
        _close_progress_bars()
        _say(e.words if isinstance(e, Terminated) else "interrupted")
        _exit(128 + (e.signum if isinstance(e, Terminated) else 2))  # as a shell reports a command a signal ended
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(141)  # what a shell reports for a command stopped by SIGPIPE
    except OSError as e:  # a file or folder the command met that no check foresaw: name it, as for every other error
        if e.errno == errno.EAGAIN and e.filename is None and not debug_requested(argv):  # (fork: "Resource temporarily
            exit_without_finalising()  # unavailable", the process limit)
            _fail(_no_new_task(e))
        if e.filename is None or debug_requested(argv):
            raise
        if e.errno in (errno.EACCES, errno.EPERM):  # (the folder that refuses, where the path is one beneath it)
            from musubi_tuner.files import permission_advice

            _fail(f"{e.filename}: {e.strerror or e}; {permission_advice(e.filename)} (--debug shows where)")
        _fail(f"{e.filename}: {e.strerror or e} (--debug shows where)")


def _no_new_task(e: BaseException) -> str:
    """A thread or process the command could not start (data-loader workers, their queues' threads), in a line: the
    limit on this user's processes (ulimit -u) or memory. It was a traceback, and once a hang (fuzz_ah 6)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
    except (ImportError, OSError, ValueError):
        shown = "?"
    return (f"cannot start a thread or process ({e}): this user's limit on processes (ulimit -u {shown}) or the memory is "
            "reached; raise it, or start fewer (--max_data_loader_n_workers 0 loads the batches in the training process)")


def without_worker_traceback(message: str, name: str) -> str:
    """A data-loader worker's error as its own message: torch raises it again in the training process as the same class
    with "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last): ..." (a cache
    deleted mid-run was a traceback with 2 workers and one line with none)."""
    if message.startswith("Caught ") and "\nOriginal Traceback" in message and f"{name}: " in message:
        return message.rsplit(f"{name}: ", 1)[1].strip()
    return message


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, a batch system's time limit, a launcher stopping its workers) or SIGHUP (the
    terminal or ssh session closed), raised where the command is, as Ctrl-C is: the file being written is abandoned
    whole, locks are released, data-loader workers are stopped, nothing half-written stays under a final name."""

    def __init__(self, signum: int = 15, words: str = "terminated"):
        super().__init__(signum, words)  # (both in args: a pickled copy, from another process, is the same)
        self.signum, self.words = signum, words


_STOPPING_SIGNALS = {"SIGTERM": "terminated", "SIGHUP": "hung up"}


class _Held:
    depth = 0  # stops_held blocks the main thread is in
    raised = False  # a stop was raised and the command is unwinding towards its "interrupted"
    command = False  # a command runs (run_cli): nothing in it catches a stop and goes on, so a stop raised is unwinding
    imports: list[str] = []  # of those, the imports (outermost first)
    stop: BaseException | None = None  # the stop that came meanwhile
    notice = None  # a timer that says why the stop waits, when an import holds it long
    threads_never_end = False  # see exit_without_finalising


def exit_without_finalising() -> None:
    """A stop being raised leaves threads that never end (a collective waiting on a process that is gone): the command
    exits after its message without Python's finalisation, whose destructors would join them, and hang until killed."""
    _Held.threads_never_end = True


NOTICE_SECONDS = 1.0
_SAY_LOCK = threading.RLock()  # the lines the command says on stderr, from its thread and the notice's timer


def _stop(error: BaseException) -> None:
    if not _Held.depth:
        _Held.raised = True
        raise error
    in_import = _Held.depth == len(_Held.imports)
    if _Held.stop is None:
        _Held.stop = error
        if in_import:  # (an import can take long: torch's takes 10-30 s from a cold disk)
            _Held.notice = threading.Timer(NOTICE_SECONDS, _notice, [f"stopping once {_Held.imports[0]} has loaded (Ctrl-C "
                                                                     f"again to stop at once)"])
            _Held.notice.daemon = True
            _Held.notice.start()
    elif in_import and isinstance(error, KeyboardInterrupt) and not isinstance(error, Terminated):
        _end_notice()
        raise error  # a second Ctrl-C in an import: asked to, it stops there, traceback and all
    # (a second stop in a write's few steps waits for them)


def _notice(line: str) -> None:
    """The timer's notice, unless it was ended meanwhile (the import done, the command saying its last line): a notice
    that fired as the import ended was written into the middle of "interrupted" (seen in the suite under load)."""
    with _SAY_LOCK:
        if _Held.notice is not None:
            _write_line(line)


def _end_notice() -> None:
    with _SAY_LOCK:
        if _Held.notice is not None:
            _Held.notice.cancel()
            _Held.notice = None


@contextlib.contextmanager
def stops_held(importing: str | None = None) -> Iterator[None]:
    """A Ctrl-C, SIGTERM or SIGHUP that arrives within the block is raised at its end: for the few steps whose
    interruption would leave something no clean-up can find (a temporary file created but its name not yet known,
    one of two renames done). Keep the block short: the user waits for it. Other threads never receive these.

    `importing`: the block imports that package, which a stop must not cut short (its compiled start-up garbles or
    loses it); the user is told why the stop waits, and a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.depth += 1
    if importing:
        _Held.imports.append(importing)
    try:
        yield
    finally:
        _Held.depth -= 1
        if importing:
            _Held.imports.pop()
        if not _Held.depth and _Held.stop is not None:
            _end_notice()
            stop, _Held.stop = _Held.stop, None
            _Held.raised = True
            raise stop


def _dropped(signum, frame) -> None:
    """A signal's handler that does nothing: the signal is taken and dropped."""


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt; all three wait for
    the end of a stops_held block. A SIGHUP ignored when the command started (`nohup`) stays ignored."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    for name, words in _STOPPING_SIGNALS.items():
        number = getattr(signal, name, None)
        if number is None or (name == "SIGHUP" and signal.getsignal(number) == signal.SIG_IGN):
            continue

        def stop(signum, frame, words=words):
            for repeated in _STOPPING_SIGNALS:  # a second one (a launcher passing it on) must not cut the clean-up short;
                # taken and dropped, not SIG_IGN: one already on its way then raised "OSError: Signal 15 ignored due to race
                # condition", a traceback per process at a terminal's hang-up (fuzz_bd 8)
                signal.signal(getattr(signal, repeated), _dropped)
            if _Held.raised and _Held.command:  # ... nor one after a Ctrl-C, which accelerate launch passes on as a SIGTERM:
                return  # raised, it met the clean-up in a data-loader's __del__, "Exception ignored ... Traceback" (fuzz_ax 11)
            _stop(Terminated(signum, words))

        signal.signal(number, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum, frame) -> None:
    if _Held.raised and _Held.command and not _Held.depth:
        # A second Ctrl-C while the command unwinds from the first: it stops at once, quietly. Raised, it met the clean-up
        # wherever it was, in a data-loader's __del__ joining its workers say, and printed "Exception ignored in ...",
        # a traceback (fuzz_z 8). What was being written stays a temporary file, as after a kill, which the next run
        # removes.
        _close_progress_bars()
        _say("interrupted")
        os._exit(128 + signum)
    _stop(KeyboardInterrupt())


def _default_sigterm() -> None:
    """Back to the default action of SIGTERM, SIGHUP (not of a SIGHUP `nohup` ignores) and Ctrl-C."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    for name in _STOPPING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) not in (signal.SIG_IGN, None):
            signal.signal(number, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is _interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)


ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def use_expandable_segments(environ=os.environ, platform: str = sys.platform) -> bool:
    """Have CUDA's caching allocator grow its segments instead of adding new ones, unless the user configured it.

    With block swap the GPU holds activations and weight copies of changing sizes, and the default allocator kept
    gigabytes reserved that no later request could use: on an H200 capped at what the planner says a step needs,
    the step ran out of memory with 2.4 GiB reserved and unused (docs/memory_planner.md). Expandable segments are
    PyTorch's answer to that. Linux only (PyTorch has them nowhere else). Returns whether it set them."""
    if not platform.startswith("linux") or any(environ.get(name) for name in ALLOCATOR_VARIABLES):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # read when CUDA starts, here and in child processes
    torch = sys.modules.get("torch")
    if torch is not None and environ is os.environ:  # imported already: tell the allocator now too
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is not None:
            setter("expandable_segments:True")
    return True


def launched() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) a launcher gave this process: (0, 1) when none did, or when they are not numbers (which
    `check_launcher_variables` refuses). (Here, not in `distributed`, which imports torch: processes that never load
    it, such as the studio's, ask too.)"""
    try:
        return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:  # (RANK=abc was a traceback in every command, lora_info's too: fuzz_ah 4)
        return 0, 1


LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE")  # what torchrun (accelerate launch's too) sets


def under_a_launcher() -> bool:
    """Started by torchrun or accelerate launch (their marks in the environment), not by hand or by leftover variables."""
    return any(os.environ.get(mark) for mark in LAUNCHER_MARKS)


def one_of_a_launchers_others() -> bool:
    """A process other than process 0 of a run of several (started by torchrun or accelerate launch, or by hand with
    process 0's address): it leaves what every process meets to process 0. RANK and WORLD_SIZE left in the
    environment (a job script, a container) without a launcher's marks or an address made the commands end in silence,
    there being no process 0 to speak (fuzz_ah 4)."""
    return launched()[0] != 0 and (under_a_launcher() or bool(os.environ.get("MASTER_ADDR")))


def check_launcher_variables() -> None:
    """RANK and WORLD_SIZE, when set, are numbers, as a launcher sets them (distributed.before_joining checks the
    address a process of several needs)."""
    for name in ("RANK", "WORLD_SIZE"):
        value = os.environ.get(name)
        if value and not value.strip().isdigit():
            raise UserError(f"{name}={value!r} in the environment is not a number (a launcher sets it: unset it to run "
                            "this command alone)")


def require_one_process(command: str) -> None:
    """A command that runs in one process, refused under a launcher of several (the caching commands: each process
    cached every item, the second refused the cache folders' lock as "another run", which the user had not started)."""
    world = launched()[1]
    if world > 1:
        if under_a_launcher():
            raise SharedError(f"{command} runs in one process ({world} were started): run it without accelerate launch or "
                              "torchrun")
        raise SharedError(f"{command} runs in one process (WORLD_SIZE={world} is set in the environment): run it without "
                          "accelerate launch or torchrun, or unset WORLD_SIZE and RANK")


def printable(text: str) -> str:
    """`text` with what a terminal acts on or hides written as escapes, as repr writes them: a newline or carriage return
    in a file's name made one error or summary entry look like two, and a downloaded LoRA's metadata could clear the
    screen, set the window's title or reverse the text (an escape sequence, U+202E), or forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _remove_created_empty_folders() -> None:
    if "musubi_tuner.files" in sys.modules:  # (a command that failed before it checked any output folder made none)
        sys.modules["musubi_tuner.files"].remove_created_empty_folders()


def _fail(message: str, shared: bool = False, about_another: bool = False) -> None:
    _default_sigterm()  # ending anyway: a launcher's SIGTERM now ends it without a second message
    _close_progress_bars()
    _remove_created_empty_folders()
    quiet = shared and one_of_a_launchers_others()
    message = printable(message)  # (one line, whatever the names in it hold)
    if not quiet:
        _say(f"error: {message}")
    _tell_the_launcher(f"error: {message}", later=LOST_PEER_LATER_SECONDS if about_another else 0)
    if quiet:  # process 0 prints it: let it, before the launcher stops every process on this one's exit
        import time

        time.sleep(SHARED_ERROR_GRACE_SECONDS)
    _exit(2)


def _exit(code: int) -> None:
    """sys.exit, or, where threads that never end are left (exit_without_finalising), an exit without finalisation."""
    if _Held.threads_never_end:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


SHARED_ERROR_GRACE_SECONDS = 2.0
# A process that reports another one's failure dates its report this much later: the launcher's summary names the
# failure of the earliest time as the root cause, and a process killed without a word (SIGKILL, the OOM killer) is
# dated when the launcher notices it, after the survivor's report. The survivor was named as the root cause.
LOST_PEER_LATER_SECONDS = 60


def lost_peer(e: BaseException) -> str | None:
    """What a failed collective means in a run of several processes, in a line, or None when `e` is not one.

    Gloo and NCCL report a process that died as a broken connection, and one that hangs as a timeout, each with a long
    traceback on every process that was waiting for it."""
    import re

    if launched()[1] <= 1:
        return None
    text = f"{type(e).__name__}: {e}"
    collective = type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError") or re.search(
        r"gloo|nccl|ProcessGroup|c10d|TCPStore", text, re.I)
    if not collective:
        return None
    if re.search(r"EADDRINUSE|address already in use|failed to listen", text, re.I):  # process 0 could not open the port
        return (f"MASTER_PORT {os.environ.get('MASTER_PORT', '?')} is in use on this machine (another run or program); choose "
                "another port (torchrun --master_port, accelerate launch --main_process_port, or MASTER_PORT)")
    if re.search(r"timed? ?out|timeout", text, re.I):
        return ("the other processes of this run did not answer in time: one of them is stuck, stopped, or much slower "
                "(they wait --ddp_timeout minutes; without it PyTorch's default, 30 minutes with gloo, 10 with NCCL)")
    return ("another process of this run stopped or lost its connection; its own error, if it printed one, is above, "
            "and the launcher's summary names the process")


def worker_ended(e: BaseException) -> str | None:
    """A data-loader worker that ended under the training, in a line, or None when `e` is not that: torch raises
    "DataLoader worker (pid 123) is killed by signal: Killed." or "... exited unexpectedly", a traceback."""
    import re

    found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: (\w+)|exited unexpectedly"
                      r"(?: with exit code (\d+))?)", str(e))
    if found is None:
        return None
    pids, _, signal_name, code = found.groups()
    how = (f"was killed ({signal_name}{': the kernel ends processes so when the host is out of memory' if signal_name == 'Killed' else ''})"
           if signal_name else f"ended{f' with status {code}' if code else ''} (its reason is the line above, when it could give one)")
    return (f"a data-loader worker (pid {pids.strip()}) {how}; --max_data_loader_n_workers 0 loads the batches in the "
            "training process")


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation failure means, in a line ("out of GPU memory: ..."), or None when `e` is not one.

    PyTorch raises torch.OutOfMemoryError from the CUDA caching allocator ("Tried to allocate 2.00 GiB"), a RuntimeError
    from the CPU allocator ("can't allocate memory: you tried to allocate N bytes") and from cuBLAS/cuDNN when their
    workspaces do not fit; Python raises MemoryError."""
    import re

    text = str(e)
    cuda = type(e).__name__ == "OutOfMemoryError" or re.search(r"CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|"
                                                                r"CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)", text)
    # (oneDNN's convolutions say "could not create a primitive" when their workspace cannot be allocated: under a memory
    # limit, the VAE's first convolution failed so, a traceback)
    host = isinstance(e, MemoryError) or "can't allocate memory" in text or text.strip() == "could not create a primitive"
    if not (cuda or host):
        return None
    on_cpu = re.search(r"tried to allocate (\d+) bytes", text)
    on_gpu = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
    size = _bytes_in_words(int(on_cpu.group(1))) if on_cpu else on_gpu.group(1) if on_gpu else ""
    card = re.search(r"GPU (\d+) has a total capacity of ([\d.]+ [KMGT]iB) of which ([\d.]+ (?:[KMGT]iB|bytes)) is free", text)
    return (f"out of {'GPU' if cuda else 'host'} memory" + (f": an allocation of {size} failed" if size else "")
            + (f" (GPU {card[1]} holds {card[2]}, {card[3]} of it free)" if card else "")
            + ("" if cuda else _address_space_limit()))


def _address_space_limit() -> str:
    """The process's address-space limit (ulimit -v), said where one is set: a batch system's limit, not the machine's
    memory, was what ran out, and the advice named the resolution and the GPU options (fuzz_bd 5)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):  # (not on Windows)
        return ""
    return "" if limit == resource.RLIM_INFINITY else (f" under this process's address-space limit of {_bytes_in_words(limit)} "
                                                       "(ulimit -v): raise it, or ask for a larger one")


def _bytes_in_words(n: int) -> str:
    """2.00 GiB, 432.0 KiB: an allocation of 442368 bytes was "0.00 GiB"."""
    if n >= 2**30 / 10:
        return f"{n / 2**30:.2f} GiB"
    return next((f"{n / size:.1f} {unit}" for unit, size in (("MiB", 2**20), ("KiB", 2**10)) if n >= size), f"{n} bytes")


def usable_standard_streams() -> None:
    """Give a closed stdout or stderr somewhere to go: os.devnull; and let stdout escape what it cannot encode.

    A command started with `>&-` or `2>&-`, by a launcher that closed them, or under Windows' pythonw.exe has
    sys.stdout / sys.stderr None, and its first print, log line or progress line failed (status 1, no word), or a
    finished run failed at its last flush. Closed descriptors 1 and 2 are taken too (dup2): a file the command opened
    later got their number, and with it the writes meant for stdout and stderr (C code's too) among its bytes."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                if devnull != fd:
                    os.dup2(devnull, fd)
                    os.close(devnull)
            except OSError:
                pass
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
    # A character stdout's encoding cannot take (a file name that is not UTF-8, held as surrogates; an emoji on an
    # ASCII or Latin-1 terminal) is escaped, as stderr escapes it, instead of failing the report that names it
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (OSError, ValueError):
            pass


def _say(line: str) -> None:
    """Print a line on stderr, if it can be written: a full or closed stderr must not turn the outcome it reports into
    another one (a traceback nobody sees, status 1). One line at a time, whole (the notice's thread writes too)."""
    with _SAY_LOCK:
        _write_line(line)


def _write_line(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")  # (one write: print's text and newline were two, between which another line went)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class LosableStdout:
    """sys.stdout while a command runs: lines it cannot write (a full disk, an I/O error, a closed stream) are lost,
    said once on stderr, and the command goes on. What commands print there ("saved X") is a side output: before, a
    training run that had saved its LoRA ended with a traceback and status 1 at its last line on a full disk.

    A reader that stops early (BrokenPipeError) still ends the command, quietly with 141 (run_cli). A report, the
    command's result, is written past this (print_report): it fails as the command's error."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.lost: BaseException | None = None

    def write(self, text: str) -> int:
        self._quietly(lambda: self.wrapped.write(text))
        return len(text)

    def flush(self) -> None:
        self._quietly(self.wrapped.flush)

    def _quietly(self, call) -> None:
        if self.lost is not None:
            return
        try:
            call()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            self.lost = e
            _quiet_stdout()  # the interpreter's last flush then has nowhere to fail
            logging.getLogger(__name__).warning("stdout: cannot write (%s); what the command prints there is lost",
                                                getattr(e, "strerror", None) or e)

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer: the stream's
        return getattr(self.wrapped, name)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _tell_the_launcher(message: str, later: int = 0) -> None:
    """Under torchrun / `accelerate launch --multi_gpu`, the launcher's failure summary shows the error file of the
    failed process as its root cause: give it our one line instead of its "To enable traceback see ..." hint, dated
    `later` seconds on when it reports another process's failure."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()) + later}, f)
    except OSError:
        pass


def print_report(text: str) -> None:
    """Print a command's report to stdout. A reader that stops early (`| head`) ends the command quietly with the status
    of a process stopped by SIGPIPE (141), as `cat` does, instead of a BrokenPipeError traceback. The report is the
    command's result: one that cannot be written (a full disk) is the command's error, not a line lost."""
    stdout = sys.stdout.wrapped if isinstance(sys.stdout, LosableStdout) else sys.stdout
    try:
        print(text, file=stdout)
        stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush then has nowhere to fail
        sys.exit(141)
    except (OSError, ValueError) as e:
        _quiet_stdout()
        raise UserError(f"stdout: cannot write the report ({getattr(e, 'strerror', None) or e})") from None


def _close_progress_bars() -> None:
    """Close bars the failure left open, so the message starts its own line instead of trailing a bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
