"""--compile: the blocks compiled one by one compute what the eager model computes, with block swap and
gradient checkpointing still in place; a platform that cannot compile gets a one-line error.

Most tests use the aot_eager backend: the same tracing (dynamo, autograd graphs) as Inductor, without the
C++ compilation that takes Inductor half a minute here; one slow test runs Inductor itself.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from helpers import dit_inputs, lora_with_random_ups, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan import compile as compiling
from musubi_tuner.hunyuan.blocks import MMDoubleStreamBlock
from musubi_tuner.hunyuan.compile import CompileOptions, check_can_compile, compile_blocks, log_graph_breaks
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

CONFIG = tiny_dit_config()
AOT = CompileOptions(backend="aot_eager")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def model(seed: int = 3) -> HunyuanVideoDiT:
    dit = HunyuanVideoDiT(CONFIG)
    dit.load_state_dict(random_dit_state_dict(CONFIG, seed=seed, scale=0.05))
    return dit.eval()


INPUTS = dit_inputs(CONFIG, batch=2, frames=2, height=4, width=4, text_lens=(5, 9))


def test_compiled_blocks_keep_their_type_and_the_checkpoint_keys():
    dit = model()
    keys = list(dit.state_dict())
    assert compile_blocks(dit, AOT) == CONFIG.mm_double_blocks_depth + CONFIG.mm_single_blocks_depth
    assert isinstance(dit.double_blocks[0], MMDoubleStreamBlock) and list(dit.state_dict()) == keys


def test_compiled_forward_equals_eager_also_with_block_swap():
    from musubi_tuner.hunyuan.offload import BlockSwap

    with torch.no_grad():
        want = model()(*INPUTS)
        compiled = model()
        compile_blocks(compiled, AOT)
        swapped = model()
        BlockSwap(swapped, 3, "cpu")
        compile_blocks(swapped, AOT)
        got, got_swapped = compiled(*INPUTS), swapped(*INPUTS)
    assert rel_err(got, want) < 1e-6 and rel_err(got_swapped, want) < 1e-6


@pytest.mark.parametrize("blocks_to_swap", [0, 1])
def test_compiled_training_step_gives_the_eager_lora_gradients_with_checkpointing(blocks_to_swap):
    from musubi_tuner.hunyuan.offload import BlockSwap

    grads = []
    for compiled in (False, True):
        dit = model()
        dit.enable_gradient_checkpointing()
        dit.train()
        if blocks_to_swap:
            BlockSwap(dit, blocks_to_swap, "cpu")
        net = lora_with_random_ups(dit, 4, 0.1)
        if compiled:
            compile_blocks(dit, AOT)
        dit(*INPUTS).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-5 and grads[0].abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [True, False])
def test_attention_outside_the_compiled_graph_gives_the_eager_lora_gradients(checkpointing, monkeypatch):
    """Training on CUDA runs each block's attention eagerly between its compiled graphs (compile.attention_outside_graph:
    a GPU check found Inductor's compiled attention giving NaN gradients). The mechanism is the same on the CPU."""
    from musubi_tuner.hunyuan import blocks

    real, compiling_at_calls = blocks.attention, []

    def recording(*args):
        compiling_at_calls.append(torch.compiler.is_compiling())
        return real(*args)

    monkeypatch.setattr(blocks, "attention", recording)
    torch._dynamo.reset()
    grads = []
    for compiled in (False, True):
        dit = model()
        if checkpointing:
            dit.enable_gradient_checkpointing()
        dit.train()
        net = lora_with_random_ups(dit, 4, 0.1)
        if compiled:
            compile_blocks(dit, AOT)
            dit.attention_outside_graph = True  # what compile_blocks sets for training on CUDA
            compiling_at_calls.clear()
        dit(*INPUTS).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    blocks_run = CONFIG.mm_double_blocks_depth + CONFIG.mm_single_blocks_depth
    # the recomputation calls it again; the token refiner's blocks (not compiled) call it too
    assert len(compiling_at_calls) == blocks_run * (2 if checkpointing else 1) + CONFIG.refiner_depth
    assert not any(compiling_at_calls)  # never traced into a graph: every call ran eagerly
    assert rel_err(grads[1], grads[0]) < 1e-5 and grads[0].abs().sum() > 0


def test_training_on_cuda_with_inductor_takes_the_attention_out_of_the_graph():
    from musubi_tuner.hunyuan.compile import attention_outside_graph

    inductor = CompileOptions()
    assert attention_outside_graph(inductor, "cuda:0", training=True)
    # generation (a forward alone), the CPU, and AOTAutograd without Inductor gave eager's numbers in the GPU check
    assert not any([attention_outside_graph(inductor, "cuda", training=False), attention_outside_graph(inductor, "cpu", training=True),
                    attention_outside_graph(AOT, "cuda", training=True)])
    dit = model()
    compile_blocks(dit, inductor, training=True)  # on the CPU: in the graph
    assert dit.attention_outside_graph is False
    with pytest.raises(UserError, match="--compile_fullgraph: training on a CUDA GPU runs the attention outside"):
        check_can_compile(CompileOptions(fullgraph=True), "cuda", training=True)


def test_graph_breaks_are_counted_and_listed_with_debug(caplog, monkeypatch):
    from musubi_tuner.hunyuan import blocks
    from musubi_tuner.hunyuan.offload import BlockSwap

    real = blocks.attention

    def reading_a_value(q, *args):  # a value read inside a compiled block: a graph break at each call
        assert float(q.float().abs().sum()) >= 0
        return real(q, *args)

    monkeypatch.setattr(blocks, "attention", reading_a_value)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dit = model()
    BlockSwap(dit, 3, "cpu")
    compile_blocks(dit, AOT)
    with torch.no_grad():
        dit(*INPUTS)
    with caplog.at_level(logging.INFO, logger="musubi_tuner"):
        log_graph_breaks(debug=False)
        log_graph_breaks(debug=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "musubi_tuner.hunyuan.compile"]
    assert "graph break(s) (--debug lists them)" in lines[0]
    assert any(line.startswith("graph break (") and "item()" in line for line in lines[2:])


def test_an_inductor_cache_folder_that_cannot_be_made_names_its_variable(monkeypatch, tmp_path):
    """fuzz_ah 9b: TORCHINDUCTOR_CACHE_DIR under a file failed at the first compiled step as "notadir/x: Not a directory",
    naming the path and not the variable it came from."""
    (tmp_path / "notadir").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "notadir" / "x"))
    with pytest.raises(UserError) as e:
        check_can_compile(CompileOptions(), "cpu")
    assert str(e.value) == (f"--compile: TORCHINDUCTOR_CACHE_DIR={tmp_path / 'notadir' / 'x'}: Not a directory; Inductor writes "
                            "its compiled code there: point TORCHINDUCTOR_CACHE_DIR at a writable folder")
    with pytest.raises(UserError, match="TORCHINDUCTOR_CACHE_DIR="):  # (torch.compile keeps its caches there whatever the
        check_can_compile(AOT, "cpu")                               # backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: "g++")
    check_can_compile(CompileOptions(), "cpu")
    assert (tmp_path / "cache").is_dir()


@pytest.mark.parametrize("backend, message", [
    ("tvm", "--compile_backend tvm: it cannot compile here ("),
    ("cudagraphs", "--compile_backend cudagraphs: captures CUDA graphs, and this run is on the CPU"),
])
def test_a_backend_that_cannot_compile_here_is_refused_before_any_model_loads(backend, message):
    """fuzz_ap 5: tvm and openxla are listed whether or not their packages are installed, and stopped the run at its
    first denoising step, after the text encoders and the DiT had loaded; cudagraphs ran eager on the CPU, with a warning
    per block."""
    import importlib.util

    if backend == "tvm" and importlib.util.find_spec("tvm") is not None:
        pytest.skip("tvm is installed here")
    with pytest.raises(UserError) as e:
        check_can_compile(CompileOptions(backend=backend), "cpu")
    assert str(e.value).startswith(message)
    check_can_compile(AOT, "cpu")  # a backend that compiles here passes


def test_a_platform_that_cannot_compile_gets_a_one_line_reason(monkeypatch):
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: None)
    with pytest.raises(UserError, match=r"--compile: Inductor on the CPU needs a C\+\+ compiler"):
        check_can_compile(CompileOptions(), "cpu")
    check_can_compile(AOT, "cpu")  # no C++ needed
    with pytest.raises(UserError, match="--compile_backend nope: not a torch.compile backend"):
        check_can_compile(CompileOptions(backend="nope"), "cpu")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UserError, match="cannot compile on Python"):
        check_can_compile(AOT, "cpu")


def test_a_compilation_that_fails_at_the_first_call_becomes_a_user_error():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("cc1plus: not found")

    dit = model()
    compile_blocks(dit, CompileOptions(backend=no_compiler))
    with pytest.raises(UserError, match=r"--compile: torch.compile failed on this platform \(.*cc1plus: not found"), \
            compiling.compile_errors(), torch.no_grad():
        dit(*INPUTS)
    torch._dynamo.reset()


def test_musubi_tuner_compile_args_override_the_single_flags():
    from argparse import Namespace

    args = Namespace(compile=True, compile_backend="inductor", compile_mode="default", compile_dynamic=None, compile_fullgraph=False,
                     compile_cache_size_limit=None, compile_args=["aot_eager", "max-autotune", "true", "True"])
    assert CompileOptions.from_args(args) == CompileOptions("aot_eager", "max-autotune", True, True, 32)
    with pytest.raises(UserError, match="--compile_dynamic maybe"):
        CompileOptions.from_args(Namespace(**{**vars(args), "compile_args": None, "compile_dynamic": "maybe"}))


@pytest.mark.slow
def test_inductor_compiled_forward_equals_eager():
    """Inductor's C++ kernels on the CPU; about 35 s on a 2-core machine with an empty compile cache."""
    if compiling.cpp_compiler() is None:
        pytest.skip("no C++ compiler")
    torch._dynamo.reset()
    with torch.no_grad():
        want = model()(*INPUTS)
        compiled = model()
        compile_blocks(compiled, CompileOptions())
        started = time.perf_counter()
        got = compiled(*INPUTS)
        first_call = time.perf_counter() - started
    print(f"first Inductor call (compilation included): {first_call:.1f} s")
    assert rel_err(got, want) < 1e-5


def test_a_diverged_run_hears_of_the_compile_problem_a_gpu_check_found():
    from musubi_tuner.hunyuan.compile import known_gradient_problem
    from musubi_tuner.training.checkpointing import CheckpointSaver
    from musubi_tuner.training.loop import divergence

    inductor = CompileOptions()
    note = known_gradient_problem(inductor, "cuda:0")
    assert note and "without --compile" in note
    # where nothing went wrong: the CPU, no --compile, another backend
    assert {known_gradient_problem(inductor, "cpu"), known_gradient_problem(None, "cuda"), known_gradient_problem(AOT, "cuda")} == {None}
    saver = CheckpointSaver.__new__(CheckpointSaver)  # nothing saved yet, not resumed
    saver.last_saved = saver.last_state = saver.resumed_from = None
    message = str(divergence("the gradient norm is nan", 3, 1, ["a.mp4"], saver, note))
    assert f"{note}; else lower --learning_rate" in message and message.startswith("the gradient norm is nan at step 3")
