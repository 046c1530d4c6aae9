"""Every command's --help reads as a manual: each visible flag has a line of help, with its default where it has one."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import torch

from musubi_tuner.cli import Parser, compute_dtype, count, embedded_guidance, frames_4n1, path, real, seed
from musubi_tuner.errors import UserError
from musubi_tuner.training.args import metadata_resolution

COMMANDS = {  # module: where its parser is built
    "cache_latents": "musubi_tuner.cache_latents", "cache_text_encoder_outputs": "musubi_tuner.cache_text_encoder_outputs",
    "hv_train_network": "musubi_tuner.training.args", "merge_lora": "musubi_tuner.merge_lora",
    "hv_generate_video": "musubi_tuner.hv_generate_video", "convert_lora": "musubi_tuner.convert_lora",
    "lora_info": "musubi_tuner.lora_info", "lora_doctor": "musubi_tuner.lora_doctor", "plan": "musubi_tuner.plan",
    "musubi-ui": "musubi_tuner.ui.server",
    "lora_post_hoc_ema": "musubi_tuner.lora_post_hoc_ema",
}


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[command]).build_parser()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_visible_flag_has_help(command):
    parser = parser_of(command)
    assert isinstance(parser, Parser), "bad input must end in one error line, not argparse's usage block"
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"{command}: flags without help: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_the_debug_flag_its_one_line_errors_point_to(command):
    """Every command's one-line errors end "(--debug shows where)"; python -m musubi_tuner.plan refused --debug."""
    assert "--debug" in parser_of(command)._option_string_actions


def test_help_shows_defaults_that_matter():
    text = parser_of("hv_train_network").format_help()
    for shown in ("base learning rate (LoRA training: about 2e-4) (default: 2e-06)", "optimizer steps to train (default: 1600)",
                  "how training noise levels are drawn (default: sigma)", "updates are scaled by alpha / rank; 0 means alpha = rank (as musubi-tuner) (default: 1)"):
        assert shown in " ".join(text.split()), shown


@pytest.mark.parametrize("kind, value, message", [
    (count(1), "0", "0: must be at least 1"),
    (count(1), "2.5", "2.5: not a whole number"),
    (count(0, 36), "37", "37: must be between 0 and 36"),
    (real(above=0), "0", "0: must be greater than 0"),
    (real(0, 1), "1.5", "1.5: must be between 0 and 1"),
    (real(), "inf", "inf: not a finite number"),
    (real(), "1e308", "1e308: past the range of float32 numbers (±3.4e+38)"),  # was a traceback where torch took it
    (real(above=0), "-4e38", "-4e38: past the range of float32 numbers (±3.4e+38)"),
    # the DiT embeds it times 1000: 1e38 passed and was a traceback at the first denoising step (training: at its first sample)
    (embedded_guidance(), "1e38", "1e38: must be between 0 and 3.40282e+35 (the DiT embeds it times 1000, a float32)"),
    (seed(32), str(2**32), f"{2**32}: must be between 0 and {2**32 - 1}, 2^32-1"),
    (frames_4n1, "6", "6 is not 4N+1 (try 5 or 9)"),
    (frames_4n1, "0", "0: must be at least 1 (4N+1: 1, 5, 9, ...)"),
    (compute_dtype, "fp8", "fp8: not a dtype to compute in; use bf16, fp16 or fp32 (fp8 weights: --fp8, --fp8_base or --fp8_llm)"),
    (compute_dtype, "f16", "f16: not a dtype to compute in; use bf16, fp16 or fp32"),
    # (read when the first LoRA was saved: a ValueError traceback once the DiT had loaded, and -5 stored as -5x-5)
    (metadata_resolution, "64,", "64,: write the width and height as W,H (or WxH, or one number for both), such as 1280,720"),
    (metadata_resolution, "-5", "-5: write the width and height as W,H (or WxH, or one number for both), such as 1280,720"),
])
def test_domains_name_the_value_and_what_is_allowed(kind, value, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        kind(value)
    assert str(e.value) == message


def test_a_metadata_resolution_is_read_as_the_lora_file_shows_it_too():
    assert [metadata_resolution(v) for v in ("64x48", "64", "1280,720")] == ["64,48", "64,64", "1280,720"]


@pytest.mark.parametrize("command, flag", [("hv_generate_video", "--vae_dtype"), ("cache_latents", "--vae_dtype"),
                                           ("cache_text_encoder_outputs", "--text_encoder_dtype"), ("hv_train_network", "--dit_dtype"),
                                           ("hv_train_network", "--vae_dtype"), ("hv_train_network", "--text_encoder_dtype")])
def test_every_compute_dtype_flag_is_checked_when_the_command_line_is_read(command, flag):
    """Not when its model loads: generation loads the VAE after all the denoising steps."""
    action = next(a for a in parser_of(command)._actions if flag in a.option_strings)
    assert action.type is compute_dtype and action.default is None  # None: the command's own default dtype


_NAMES_A_PATH = re.compile(r"(^|_)(dit|vae|text_encoder[12]|path|dir|file|weights?|config|model|input|output|workspace|resume|prompts)$")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_that_names_a_file_or_folder_refuses_an_empty_value(command):
    """An unset shell variable (`--save_path $OUT`) gives "": read as Path("") it was the current folder, so generation
    wrote its video where it ran and merge_lora failed with a traceback on `--lora_weight ""`."""
    parser = parser_of(command)
    flags = [a for a in parser._actions
             if isinstance(a, argparse._StoreAction) and not a.choices and _NAMES_A_PATH.search(a.dest)]
    assert flags, "the pattern finds no flag: it no longer matches the names"
    for action in flags:
        assert action.type is path, f"{command} {action.option_strings or action.dest}: not typed as a path"
        given = [action.option_strings[0], ""] if action.option_strings else [""]
        with pytest.raises(UserError, match=r"is empty: give a file or folder \(an unset shell variable gives an empty value\)"):
            parser.parse_args(given)


def test_a_bad_value_becomes_one_line_naming_the_flag():
    p = Parser(prog="x")
    p.add_argument("--steps", type=count(1))
    with pytest.raises(UserError) as e:
        p.parse_args(["--steps", "0"])
    assert str(e.value) == "--steps 0: must be at least 1 (see x --help)"
    with pytest.raises(UserError) as e:
        p.parse_args(["--stepz", "3"])
    assert str(e.value) == "unrecognized arguments: --stepz 3 (see x --help)"


def test_a_device_this_machine_lacks_is_named():
    import torch

    from musubi_tuner.cli import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device gpu: not a device"):
        resolve_device("gpu")
    with pytest.raises(UserError, match=r"--device cpu:1: there is one cpu device here; use --device cpu"):
        resolve_device("cpu:1")  # a typo for cuda:1, which torch would run on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device cuda:1: (this PyTorch is built without CUDA|no CUDA device is visible)"):
            resolve_device("cuda:1")


def test_every_command_asks_for_expandable_cuda_segments_unless_the_user_configured_the_allocator():
    """errors.run_cli, which every command runs through, sets PYTORCH_CUDA_ALLOC_CONF for itself and its child processes."""
    import os
    import subprocess
    import sys

    from musubi_tuner.errors import use_expandable_segments

    show = ("import os; from musubi_tuner.errors import run_cli; "
            "run_cli(lambda argv: print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF')), [])")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    for extra, seen in (({}, "expandable_segments:True" if sys.platform.startswith("linux") else "None"),
                        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"}, "max_split_size_mb:256"),
                        ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "None")):
        done = subprocess.run([sys.executable, "-c", show], env={**clean, **extra}, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == seen, (extra, done.stdout, done.stderr)
    environ = {}
    assert not use_expandable_segments(environ, platform="win32") and environ == {}  # PyTorch has them on Linux only


@pytest.mark.parametrize("command", ["hv_generate_video", "hv_train_network"])
def test_blocks_to_swap_0_means_none_as_in_musubi_tuner(command):
    action = next(a for a in parser_of(command)._actions if "--blocks_to_swap" in a.option_strings)
    assert action.type("0") == 0  # falsy: the command builds no BlockSwap
    with pytest.raises(argparse.ArgumentTypeError):
        action.type("-1")


class _ItemsWhoseCacheIsGone(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise UserError("/data/cache/a_hv.safetensors: cache file not found; run the caching commands again")


def test_an_error_a_data_loader_worker_meets_is_the_commands_one_line(capsys):
    """torch raises a worker's error again in the training process, its message a traceback ("Caught UserError in
    DataLoader worker process 0. Original Traceback ..."): a cache deleted mid-run was one line with no workers and a
    traceback with two."""
    from musubi_tuner.errors import run_cli

    def main(argv):
        list(torch.utils.data.DataLoader(_ItemsWhoseCacheIsGone(), batch_size=None, num_workers=1))

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: /data/cache/a_hv.safetensors: cache file not found; run the caching commands again\n"


def test_a_command_that_ends_in_a_traceback_removes_the_empty_folders_it_made(tmp_path):
    """As one that ends in an error line does: a damaged fp8 DiT's traceback left an empty --save_path behind (fuzz_y 12).
    A folder that holds a file by then stays, and so does what was there before the command."""
    from musubi_tuner.errors import run_cli
    from musubi_tuner.files import require_writable_folder

    (tmp_path / "before").mkdir()

    def main(argv):
        require_writable_folder(tmp_path / "before" / "made" / "empty", "--save_path")
        require_writable_folder(tmp_path / "kept", "--output_dir")
        (tmp_path / "kept" / "x.txt").write_text("written")
        raise ZeroDivisionError("a fault no check foresaw")

    with pytest.raises(ZeroDivisionError):
        run_cli(main, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before", "kept"] and not list((tmp_path / "before").iterdir())


def test_every_command_runs_under_python_OO_which_strips_docstrings():
    """fuzz_ah 2: PYTHONOPTIMIZE=2 (set system-wide in some containers) made every command but training a traceback
    at start, --help included: their parsers took their description from the module's docstring, then None."""
    import subprocess
    import sys

    modules = [*COMMANDS.values(), "musubi_tuner.demo", "musubi_tuner.demo.synthetic_data"]
    modules[modules.index("musubi_tuner.training.args")] = "musubi_tuner.hv_train_network"
    script = ("import runpy, sys\nfor name in sys.argv[1:]:\n    sys.argv = [name, '--help']\n    try:\n"
              "        runpy.run_module(name, run_name='__main__', alter_sys=True)\n    except SystemExit as e:\n"
              "        assert e.code in (0, None), (name, e.code)\n    else:\n        raise AssertionError(name)\n")
    done = subprocess.run([sys.executable, "-OO", "-c", script, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(modules), done.stdout[-3000:]


def test_under_an_ascii_locale_utf8_text_is_read_and_an_unwritable_name_blames_the_locale(tmp_path):
    """fuzz_ah 1: with LC_ALL=C and Python's UTF-8 mode off, a prompt "un chat très" was "not UTF-8 text", and a
    dataset folder "vidéos" was said to hold "half of a surrogate pair"."""
    import os
    import subprocess
    import sys

    (tmp_path / "d.toml").write_text('[general]\nresolution = [64, 64]\n[[datasets]]\nvideo_directory = "vidéos"\n',
                                     encoding="utf-8")
    script = ("import sys\nfrom musubi_tuner.cli import text\nfrom musubi_tuner.errors import UserError\n"
              "from musubi_tuner.data.config import load_dataset_config\n"
              "print(sys.getfilesystemencoding(), text(sys.argv[1]) == 'un chat tr\\u00e8s')\n"  # (--prompt's type)
              "sys.stdout.flush()\ntry:\n    load_dataset_config(sys.argv[2])\nexcept UserError as e:\n"
              "    sys.stdout.buffer.write(str(e).encode() + b'\\n')\n")
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = subprocess.run([sys.executable, "-c", script, "un chat très".encode(), str(tmp_path / "d.toml")], env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, message = done.stdout.decode().splitlines()
    assert first == "ascii True"
    assert message.endswith("holds é (\\u00e9) at character 4, which this process's locale cannot write in a file name "
                            "(file-system encoding ascii); run with PYTHONUTF8=1 or LANG=C.UTF-8"), message


def test_a_command_run_from_a_deleted_folder_says_so(tmp_path):
    """fuzz_ah 3: started in a folder deleted since (a shell still in it), every command died importing torch with
    "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", which blames the torch install."""
    import os
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    done = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" -m musubi_tuner.lora_info /nowhere.safetensors',
                           "sh", str(gone), sys.executable], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: the current folder no longer exists (deleted, or replaced by a new one of its name): "
                                   "cd into a folder that exists and run the command again")


@pytest.mark.parametrize("mask, denied", [(0o777, "read/write/enter"), (0o277, "write"), (0o177, "enter")])
def test_a_umask_that_locks_the_owner_out_is_refused_before_anything_is_made(tmp_path, mask, denied):
    """fuzz_ah 9a: under umask 0777 the cache folder was made with mode 000, then its permissions were blamed, and the
    empty folder stayed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    done = subprocess.run([sys.executable, "-m", "musubi_tuner.lora_info", str(tmp_path / "x.safetensors")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, preexec_fn=lambda: os.umask(mask))
    assert done.returncode == 2 and list(tmp_path.iterdir()) == []
    assert done.stderr.strip() == (f"error: the umask is {mask:04o}: the folders and files this command makes would be "
                                   f"unusable by you (no {denied} for their owner); set a usual one (umask 022) and run the "
                                   "command again")


def test_a_negative_number_with_an_exponent_is_a_value_not_an_option():
    """fuzz_as 4: argparse read -1e-1 as an option ("--logit_mean: expected one argument", for a flag given one value);
    -inf is now read as the value it is, and refused as one."""
    from musubi_tuner.errors import UserError
    from musubi_tuner.hv_generate_video import build_parser

    flags = ["--dit", "d", "--vae", "v", "--prompt", "p", "--save_path", "s", "--lora_weight", "a", "b"]
    args = build_parser().parse_args([*flags, "--guidance_scale", "-1e1", "--lora_multiplier", "-1e-1", "-2E+0"])
    assert (args.guidance_scale, args.lora_multiplier) == (-10.0, [-0.1, -2.0])
    with pytest.raises(UserError, match=r"^--lora_multiplier -inf: not a finite number"):
        build_parser().parse_args([*flags, "--lora_multiplier", "-inf"])
