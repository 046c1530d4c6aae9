"""The LoRA tools on inputs a user gives by accident or habit: an fp8 LoRA converted to the other naming keeps its
update (alpha / rank folded into bf16 factors, said), a --sigma_rel whose formula overflows is one error line, and a
setting that does nothing (--diffusers_prefix with --target default, --beta2 with two checkpoints, the same LoRA
twice) is said in a warning."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_tuner import convert_lora, lora_post_hoc_ema, merge_lora
from musubi_tuner.errors import UserError

from helpers import run_main, tiny_dit_file_and_lora


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """The tiny DiT and a LoRA on it as musubi-tuner trains them (alpha 1, rank 32: a scale of 1/32), lora_up small."""
    tmp = tmp_path_factory.mktemp("settings")
    dit, weights, _ = tiny_dit_file_and_lora(tmp, rank=32, alpha=1.0, std=0.01, generator=torch.Generator().manual_seed(0))
    return tmp, dit, weights


def updates(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's update in float32: kohya up @ down * alpha / rank, or the other naming's B @ A."""
    out = {}
    for key, down in weights.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up = weights[f"{name}.lora_up.weight"].float()
            out[name.removeprefix("lora_unet_")] = up @ down.float() * (weights[f"{name}.alpha"].float() / down.shape[0])
        elif key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight").removeprefix("diffusion_model.")
            out[name.replace(".", "_")] = weights[key.replace("lora_A", "lora_B")].float() @ down.float()
    return out


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_convert_to_other_keeps_an_fp8_loras_update(lora, tmp_path, capsys, caplog, dtype):
    _, _, weights = lora
    fp8 = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in weights.items()}
    src, out = tmp_path / "fp8.safetensors", tmp_path / "other.safetensors"
    save_file(fp8, str(src))
    with caplog.at_level(logging.INFO):
        status, _, err = run_main(convert_lora.main, ["--input", src, "--output", out, "--target", "other"], capsys)
    assert status == 0, err
    written = load_file(str(out))
    expected, got = updates(fp8), updates(written)
    assert expected.keys() == got.keys() and len(got) == 20
    for name in expected:
        assert ((got[name] - expected[name]).norm() / expected[name].norm()).item() < 0.01, name
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert f"its {str(dtype).removeprefix('torch.')} LoRA factors are written in bf16 with alpha / rank folded in" in caplog.text


def test_convert_keeps_other_dtypes_as_stored(lora, tmp_path, capsys):
    _, _, weights = lora
    src, out = tmp_path / "fp16.safetensors", tmp_path / "other.safetensors"
    save_file({k: v.half() for k, v in weights.items()}, str(src))
    assert run_main(convert_lora.main, ["--input", src, "--output", out, "--target", "other"], capsys)[0] == 0
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16}


def test_diffusers_prefix_with_target_default_is_said_to_be_ignored(lora, tmp_path, capsys, caplog):
    _, _, weights = lora
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(weights, str(src))
    with caplog.at_level(logging.WARNING):
        status, _, _ = run_main(convert_lora.main, ["--input", src, "--output", out, "--target", "default",
                                                    "--diffusers_prefix", "transformer"], capsys)
    assert status == 0 and load_file(str(out)).keys() == weights.keys()
    assert "--diffusers_prefix transformer is ignored: it names the keys of --target other" in caplog.text
    caplog.clear()
    run_main(convert_lora.main, ["--input", src, "--output", tmp_path / "o2.safetensors", "--target", "other",
                                 "--diffusers_prefix", "transformer"], capsys)
    assert "is ignored" not in caplog.text


def test_the_same_lora_twice_is_warned_about(lora, tmp_path, capsys, caplog):
    _, dit, weights = lora
    src = tmp_path / "a.safetensors"
    save_file(weights, str(src))
    with caplog.at_level(logging.WARNING):
        status, _, _ = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", src, f"{tmp_path}/./a.safetensors", src,
                                                  "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"], capsys)
    assert status == 0
    assert f"{tmp_path}/./a.safetensors is given twice among the LoRA files (also as {src}): it is applied twice" in caplog.text
    assert f"{src} is given twice among the LoRA files: it is applied twice to the same blocks" in caplog.text
    assert caplog.text.count("is given twice among the LoRA files") == 2  # once each: the checks and the merge said it
    caplog.clear()  # one file on two sets of blocks, each with its multiplier, is a way to weigh them apart
    status, _, _ = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", src, src, "--lora_blocks", "double", "single",
                                              "--save_merged_model", tmp_path / "m2.safetensors", "--device", "cpu"], capsys)
    assert status == 0 and "given twice" not in caplog.text


@pytest.fixture
def two_checkpoints(lora, tmp_path):
    _, _, weights = lora
    paths = [tmp_path / "run-1.safetensors", tmp_path / "run-2.safetensors"]
    for i, path in enumerate(paths):
        save_file({k: v if k.endswith(".alpha") else v * (i + 1) for k, v in weights.items()}, str(path))
    return paths


@pytest.mark.parametrize("sigma_rel", ["1e-160", "1e-200"])
def test_a_sigma_rel_whose_formula_overflows_is_one_error_line(two_checkpoints, tmp_path, capsys, sigma_rel):
    out = tmp_path / "ema.safetensors"
    status, _, err = run_main(lora_post_hoc_ema.main, [*two_checkpoints, "--sigma_rel", sigma_rel, "--output_file", out], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and "Traceback" not in err and len(errors) == 1 and errors[0].startswith(f"error: --sigma_rel {sigma_rel}: ")
    assert not out.exists()


def test_beta2_with_two_checkpoints_is_said_to_be_ignored(two_checkpoints, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        status, stdout, _ = run_main(lora_post_hoc_ema.main, [*two_checkpoints, "--beta", "0.5", "--beta2", "0.9", "--no_sort",
                                                              "--output_file", tmp_path / "ema.safetensors"], capsys)
    assert status == 0 and "beta per merge: 0.5000" in stdout
    assert "--beta2 0.9 is ignored: two checkpoints make one merge, at --beta 0.5" in caplog.text


def test_an_output_that_is_a_folder_is_refused_before_any_work(lora, tmp_path, capsys):
    """fuzz_aq 1: merge_lora, convert_lora and post-hoc EMA found a folder at the output's name at the final rename, after
    the whole work (a 13B merge: minutes, and a full-size temporary file)."""
    _, dit, weights = lora
    src = tmp_path / "a.safetensors"
    save_file(weights, str(src))
    (tmp_path / "out.safetensors").mkdir()
    out = tmp_path / "out.safetensors"
    for main, argv, flag in ((merge_lora.main, ["--dit", dit, "--lora_weight", src, "--save_merged_model", out], "--save_merged_model"),
                             (convert_lora.main, ["--input", src, "--output", out, "--target", "other"], "--output"),
                             (lora_post_hoc_ema.main, [src, src, "--output_file", out], "--output_file")):
        status, _, err = run_main(main, argv, capsys)
        assert (status, err.strip()) == (2, f"error: {flag} {out}: cannot write: a folder has this name; move it away"), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "out.safetensors"]  # (no temporary file)


def test_an_output_another_command_is_writing_is_refused_naming_it(lora, tmp_path, capsys):
    """fuzz_aq 5: a training (or a conversion) started during a merge into one of its names said it saved its file, and
    the merge's rename then replaced it with the merged DiT."""
    import subprocess
    import sys

    from musubi_tuner.files import output_file_lock
    from musubi_tuner.training.checkpointing import check_final_names_free

    _, _, weights = lora
    src = tmp_path / "a.safetensors"
    save_file(weights, str(src))
    out = tmp_path / "out" / "l.safetensors"
    out.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom musubi_tuner.files import RunLock\n"
                               f"with RunLock({str(output_file_lock(out))!r}, 'merge into this file', '--save_merged_model'):\n"
                               "    print('held', flush=True)\n    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        status, _, err = run_main(convert_lora.main, ["--input", src, "--output", out, "--target", "other"], capsys)
        assert status == 2 and err.startswith(f"error: --output {out}: another command is writing this file (pid {holder.pid} "), err
        with pytest.raises(UserError, match=rf"--output_dir / --output_name {re.escape(str(out))}: another command is writing this "
                                            rf"file \(pid {holder.pid} "):
            check_final_names_free(out.parent, "l", "musubi")
        check_final_names_free(out.parent, "other", "musubi")  # (its other names are free)
    finally:
        holder.kill()
        holder.wait()
    check_final_names_free(out.parent, "l", "musubi")  # the holder gone, the name is free
    assert not out.exists()


def test_an_empty_lora_blocks_is_refused_not_taken_for_every_block(lora, tmp_path, capsys):
    """fuzz_as 5: `--lora_blocks $BLOCKS` with the variable unset merged the whole LoRA without a word (the empty pattern
    matches every module)."""
    _, dit, weights = lora
    src = tmp_path / "a.safetensors"
    save_file(weights, str(src))
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", src, "--lora_blocks", "",
                                                "--save_merged_model", tmp_path / "m.safetensors"], capsys)
    assert (status, err.strip()) == (2, "error: --lora_blocks is empty (an unset shell variable gives an empty value): give all, "
                                        "double, single or a regular expression")
    assert not (tmp_path / "m.safetensors").exists()


def test_the_update_norm_of_a_rank_far_above_the_layer_width_takes_the_product_not_rank_squared_memory():
    """fuzz_bb 5: a LoRA of rank 100,000 on the tiny DiT's layers made lora_info and the doctor ask for 75 GB: the norm
    went through two (rank, rank) Gram matrices where the (out, in) product is 64 values. Measured in a process of its
    own: the growth of its resident memory (the Gram matrices at rank 8,000 are 1 GB)."""
    import subprocess
    import sys

    code = ("import resource, torch\nfrom musubi_tuner.networks.lora_inspect import update_norm\n"
            "g = torch.Generator().manual_seed(0)\nup, down = torch.randn(8, 8000, generator=g), torch.randn(8000, 8, generator=g)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nnorm = update_norm(down, up, 0.5)\n"
            "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
            "print(norm / ((up.double() @ down.double()).norm().item() * 0.5), grown // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    ratio, grown_mb = done.stdout.split()
    assert abs(float(ratio) - 1) < 1e-12 and int(grown_mb) < 200, done.stdout + done.stderr[-2000:]
    small_up, small_down = torch.randn(64, 4, dtype=torch.float64), torch.randn(4, 48, dtype=torch.float64)  # (rank below
    from musubi_tuner.networks.lora_inspect import update_norm  # the width: the Gram matrices' way)

    assert update_norm(small_down, small_up, 2.0) == pytest.approx((small_up @ small_down).norm().item() * 2.0, rel=1e-12)
