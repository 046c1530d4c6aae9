"""--compile: torch.compile each double and single block of the DiT on its own, as musubi-tuner does.

Block by block rather than the whole model: block swap's hooks and gradient checkpointing run between the
blocks, in Python, so they keep working, and all blocks of a kind share one compiled graph per input shape.
Compilation happens at the first call (the first steps are slow); its failures and the platforms that
cannot compile at all are reported as one-line errors.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from musubi_tuner.cli import count
from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DYNAMIC = {"true": True, "false": False, "auto": None, None: None}


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str = "default"
    dynamic: bool | None = None
    fullgraph: bool = False
    cache_size_limit: int | None = None

    @classmethod
    def from_args(cls, args) -> "CompileOptions | None":
        """From --compile and its flags (None without --compile); musubi-tuner's deprecated --compile_args
        BACKEND MODE DYNAMIC FULLGRAPH overrides them and, as there, raises the cache size limit to 32."""
        if not getattr(args, "compile", False):
            return None
        backend, mode = args.compile_backend or "inductor", args.compile_mode or "default"
        dynamic, fullgraph = args.compile_dynamic, args.compile_fullgraph
        limit = args.compile_cache_size_limit
        legacy = getattr(args, "compile_args", None)
        if legacy:
            backend, mode, dynamic, fullgraph = legacy
            fullgraph = fullgraph.lower() == "true"
            dynamic = dynamic.lower()
            limit = limit or 32
        if mode not in COMPILE_MODES:
            raise UserError(f"--compile_mode {mode}: one of {', '.join(COMPILE_MODES)}")
        if dynamic not in DYNAMIC:
            raise UserError(f"--compile_dynamic {dynamic}: true, false or auto")
        if limit is not None and limit < 1:
            raise UserError(f"--compile_cache_size_limit {limit}: at least 1")
        return cls(backend, mode, DYNAMIC[dynamic], bool(fullgraph), limit)


SETTINGS = ("compile_backend", "compile_mode", "compile_dynamic", "compile_fullgraph", "compile_cache_size_limit", "compile_args")


def add_compile_flags(group) -> None:
    """--compile and its settings, for hv_train_network and hv_generate_video. The settings default to None (inductor
    and mode default once --compile is given), so that one given without --compile is told from none given."""
    group.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks")
    group.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor)")
    group.add_argument("--compile_mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (default: default)")
    group.add_argument("--compile_dynamic", choices=("true", "false", "auto"), default=None, help="torch.compile dynamic shapes")
    group.add_argument("--compile_fullgraph", action="store_true", help="torch.compile fullgraph=True")
    group.add_argument("--compile_cache_size_limit", type=count(1), default=None, help="torch._dynamo cache size limit")


def check_compile_flags(args) -> CompileOptions | None:
    """The run's compile options; the settings given without --compile are said to be ignored (they were, unsaid)."""
    options = CompileOptions.from_args(args)
    if options is None:
        given = [f"--{name}" for name in SETTINGS if getattr(args, name, None) not in (None, False)]
        if given:
            logger.warning("%s: act%s with --compile, which is not given: ignored", ", ".join(given), "" if len(given) > 1 else "s")
    return options


def attention_outside_graph(options: CompileOptions, device: torch.device | str, training: bool) -> bool:
    """Whether compiled blocks run their attention eagerly, between two compiled graphs: when training on CUDA with
    Inductor.

    bench/gpu_compile_probe.py on an H200 (torch 2.11.0+cu130): with SDPA inside Inductor's graphs, LoRA gradients
    came out NaN under gradient checkpointing and the step hit an illegal memory access without it. SDPA's math
    kernel, AOTAutograd without Inductor, or the checkpoint traced into the graph each gave eager's gradients, so the
    fault is in the attention's saved outputs crossing from Inductor's forward graph to its backward (docs/dit.md).
    Inductor still compiles the rest of each block; a forward alone (generation) keeps the attention in its graph."""
    return training and options.backend == "inductor" and torch.device(device).type == "cuda"


def check_can_compile(options: CompileOptions, device: torch.device | str, training: bool = False) -> None:
    """Stop before any model loads where this platform cannot compile, naming what is missing."""
    device = torch.device(device)
    if options.fullgraph and attention_outside_graph(options, device, training):
        raise UserError("--compile_fullgraph: training on a CUDA GPU runs the attention outside the compiled graphs (Inductor's "
                        "compiled attention gave NaN gradients in this project's GPU check, docs/dit.md), so a block is two "
                        "graphs, not one; drop --compile_fullgraph")
    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile: torch {torch.__version__} cannot compile on Python {sys.version.split()[0]} "
                        "(torch.compile does not support it); drop --compile or use a supported Python")
    if options.backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"--compile_backend {options.backend}: not a torch.compile backend here "
                        f"(available: {', '.join(torch._dynamo.list_backends())})")
    _check_inductor_cache()  # (torch.compile keeps its caches there whatever the backend: aot_eager failed on it too)
    if options.backend != "inductor":
        _check_other_backend(options.backend, device)
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("--compile: Inductor needs Triton to compile for CUDA GPUs, and it is not installed "
                            "(pip install triton; on Windows: pip install triton-windows), or drop --compile")
    elif device.type == "cpu" and cpp_compiler() is None:
        raise UserError("--compile: Inductor on the CPU needs a C++ compiler (g++ or clang++, or one named by $CXX) "
                        "and none was found; install one or drop --compile")


def _check_other_backend(backend: str, device: torch.device) -> None:
    """A backend other than Inductor compiles a one-op function here, before any model loads: tvm and openxla are
    listed whether or not their packages are installed, and failed at the first denoising step (fuzz_ap 5); cudagraphs
    captures CUDA work only."""
    if backend == "cudagraphs" and device.type != "cuda":
        raise UserError("--compile_backend cudagraphs: captures CUDA graphs, and this run is on the CPU (it would run eager, "
                        "with a warning per block); use inductor or drop --compile")
    try:
        compiled = torch.compile(lambda x: x * 2 + 1, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(torch.ones(4, device=device))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"--compile_backend {backend}: it cannot compile here ({type(e).__name__}: {first}); use inductor or "
                        "another backend") from None


def _check_inductor_cache() -> None:
    """Inductor keeps its generated code in TORCHINDUCTOR_CACHE_DIR (else a folder in the temporary folder): one it
    cannot make or write is named with where it comes from, before any model loads (the path alone was named, at the
    first compiled step: fuzz_ah 9b)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    folder = os.path.abspath(given or default_cache_dir())
    source = f"TORCHINDUCTOR_CACHE_DIR={given}" if given else f"{folder} (Inductor's cache folder; TORCHINDUCTOR_CACHE_DIR moves it)"
    try:
        os.makedirs(folder, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "not writable"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem:
        raise UserError(f"--compile: {source}: {problem}; Inductor writes its compiled code there: point "
                        "TORCHINDUCTOR_CACHE_DIR at a writable folder")


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would call on the CPU, or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        found = shutil.which(name)
        if found:
            return found
    return None


def compile_blocks(model, options: CompileOptions, training: bool = False) -> int:
    """Compile every double and single block in place (module types and state-dict keys unchanged); returns the count.

    `training`: the blocks will run backward too (see attention_outside_graph); the model is on its device already."""
    model.attention_outside_graph = attention_outside_graph(options, model.device, training)
    if model.attention_outside_graph:
        logger.info("--compile: training on CUDA, the attention runs between the compiled graphs of each block")
    if options.cache_size_limit:
        torch._dynamo.config.cache_size_limit = options.cache_size_limit
    # the one complex op in a block is the view of the rope table as (cos, sin) pairs: nothing to generate code for
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")
    blocks = [*model.double_blocks, *model.single_blocks]
    for block in blocks:
        block.compile(backend=options.backend, mode=options.mode, dynamic=options.dynamic, fullgraph=options.fullgraph)
    return len(blocks)


def known_gradient_problem(options: CompileOptions | None, device: torch.device | str) -> str | None:
    """What a diverged run should hear when its set-up is one a GPU check saw go wrong, else None.

    Training with Inductor on CUDA: the fault the GPU check found is worked around (attention_outside_graph), and the
    work-around has not run on a GPU yet."""
    if options is None or not attention_outside_graph(options, device, training=True):
        return None
    return ("--compile on a CUDA GPU gave NaN gradients in this project's GPU check until the attention was moved out of "
            "the compiled graphs (docs/dit.md, \"On a GPU\"); if this run diverged with it, train without --compile")


@contextmanager
def compile_errors():
    """A compilation that fails at the first call becomes a one-line error (--debug shows the traceback)."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError
    from torch._inductor.exc import InductorError

    try:
        yield
    except (BackendCompilerFailed, InternalTorchDynamoError, InductorError) as e:
        cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # the compiler's own complaint, not dynamo's wrapper
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise UserError(f"--compile: torch.compile failed on this platform ({type(cause).__name__}: {first[:200]}); "
                        "run without --compile") from e


def log_graph_breaks(debug: bool = False) -> None:
    """One line with the graphs compiled and the graph breaks; then each break's reason, at debug level unless `debug`."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    listed = debug or logger.isEnabledFor(logging.DEBUG)
    logger.info("torch.compile: %d graph(s) compiled, %d graph break(s)%s", counters["stats"]["unique_graphs"], sum(breaks.values()),
                " (--debug lists them)" if breaks and not listed else "")
    for reason, times in breaks.items():
        logger.log(logging.INFO if debug else logging.DEBUG, "graph break (%dx): %s", times, reason)
