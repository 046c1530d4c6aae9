"""Bad LoRA files at every command that reads them: one `error:` line naming the file and the entry, exit 2, before
any model is read, nothing written; --allow_partial_lora applies the rest and lists what it drops. info and the
doctor report such files instead of failing, and stop quietly when their reader goes away (`| head`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner import convert_lora, hv_generate_video, hv_train_network, lora_doctor, lora_info, merge_lora
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.files import StateDictFile

from helpers import run_main, tiny_dit_file_and_lora

ROOT = Path(__file__).resolve().parents[2]
NAN_KEY = "lora_unet_single_blocks_1_linear1.lora_up.weight"
RANK_KEY = "lora_unet_double_blocks_1_img_mlp_fc2"
DIVERGED = "single_blocks.1.linear1: its update reaches"  # (NAN_KEY's module, its lora_up at 1e30)
# empty LoHa / LoKr modules on RANK_KEY's layer (64, 256): the factors, the key named first, and why
EMPTY_LYCORIS = {
    "loha rank zero": {f"{RANK_KEY}.hada_w1_a": torch.zeros(64, 0), f"{RANK_KEY}.hada_w1_b": torch.zeros(0, 256),
                       f"{RANK_KEY}.hada_w2_a": torch.zeros(64, 0), f"{RANK_KEY}.hada_w2_b": torch.zeros(0, 256),
                       f"{RANK_KEY}.alpha": torch.tensor(1.0)},
    "lokr rank zero": {f"{RANK_KEY}.lokr_w1": torch.ones(4, 4), f"{RANK_KEY}.lokr_w2_a": torch.zeros(16, 0),
                       f"{RANK_KEY}.lokr_w2_b": torch.zeros(0, 64), f"{RANK_KEY}.alpha": torch.tensor(1.0)},
    "lokr w1 rank zero": {f"{RANK_KEY}.lokr_w1_a": torch.zeros(4, 0), f"{RANK_KEY}.lokr_w1_b": torch.zeros(0, 4),
                          f"{RANK_KEY}.lokr_w2": torch.ones(16, 64), f"{RANK_KEY}.alpha": torch.tensor(1.0)},
    "lokr empty w1": {f"{RANK_KEY}.lokr_w1": torch.zeros(0, 0), f"{RANK_KEY}.lokr_w2": torch.ones(16, 16)},
}
# LoKr products whose factors' ranks disagree (fuzz_aw 10: refused as "a LoKr module without its w2", naming lokr_w1)
MISMATCHED_LOKR = {
    "lokr w2 ranks": {f"{RANK_KEY}.lokr_w1": torch.ones(4, 4), f"{RANK_KEY}.lokr_w2_a": torch.ones(16, 4) * 0.01,
                      f"{RANK_KEY}.lokr_w2_b": torch.ones(3, 64) * 0.01, f"{RANK_KEY}.alpha": torch.tensor(4.0)},
    "lokr w1 ranks": {f"{RANK_KEY}.lokr_w1_a": torch.ones(4, 2), f"{RANK_KEY}.lokr_w1_b": torch.ones(3, 4),
                      f"{RANK_KEY}.lokr_w2": torch.ones(16, 64) * 0.01, f"{RANK_KEY}.alpha": torch.tensor(4.0)},
}
EMPTY_WHY = {
    "loha rank zero": (f"{RANK_KEY}.hada_w1_a", "rank 0: its hada_w1_a [64, 0] and hada_w1_b [0, 256] and hada_w2_a [64, 0] and "
                                                "hada_w2_b [0, 256] are empty (a damaged file)"),
    "lokr rank zero": (f"{RANK_KEY}.lokr_w2_a", "rank 0: its lokr_w2_a [16, 0] and lokr_w2_b [0, 64] are empty (a damaged file)"),
    "lokr w1 rank zero": (f"{RANK_KEY}.lokr_w1_a", "rank 0: its lokr_w1_a [4, 0] and lokr_w1_b [0, 4] are empty (a damaged file)"),
    "lokr empty w1": (f"{RANK_KEY}.lokr_w1", "its lokr_w1 [0, 0] is empty (a damaged file)"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    dit, good, _ = tiny_dit_file_and_lora(tmp)
    made = {"good": good,
            "nan": {**good, NAN_KEY: torch.full_like(good[NAN_KEY], float("nan"))},
            "diverged": {**good, NAN_KEY: torch.full_like(good[NAN_KEY], 1e30)},  # finite: a diverged training's weights
            "ranks": {**good, f"{RANK_KEY}.lora_down.weight": torch.zeros(8, 256)},  # lora_up is (64, 4)
            "other size": {**good, f"{RANK_KEY}.lora_up.weight": torch.zeros(128, 4)},  # whole, but the DiT's layer is (64, 256)
            "tucker": {**good, "lora_unet_double_blocks_0_img_attn_proj.hada_t1": torch.zeros(2, 2, 3, 3)},
            "bias diff": {**good, "lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.full((64,), 0.01)},
            "alpha vector": {**good, f"{RANK_KEY}.alpha": torch.tensor([2.0, 2.0])},
            "rank zero": {**good, f"{RANK_KEY}.lora_down.weight": torch.zeros(0, 256), f"{RANK_KEY}.lora_up.weight": torch.zeros(64, 0)},
            **{name: {**{k: v for k, v in good.items() if not k.startswith(RANK_KEY)}, **factors}
               for name, factors in {**EMPTY_LYCORIS, **MISMATCHED_LOKR}.items()},
            "lokr other size": {**{k: v for k, v in good.items() if not k.startswith(RANK_KEY)}, f"{RANK_KEY}.lokr_w1": torch.ones(8, 8),
                                f"{RANK_KEY}.lokr_w2_a": torch.ones(16, 4) * 0.01, f"{RANK_KEY}.lokr_w2_b": torch.ones(4, 32) * 0.01},
            "extra block": {**good, "lora_unet_double_blocks_5_img_attn_proj.lora_down.weight": torch.zeros(4, 64),
                            "lora_unet_double_blocks_5_img_attn_proj.lora_up.weight": torch.zeros(64, 4)},
            "fp8": {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in good.items()},
            "fp8 as float32": {k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v for k, v in good.items()}}
    paths = {}
    for name, sd in made.items():
        paths[name] = tmp / f"{name.replace(' ', '_')}.safetensors"
        save_file(sd, str(paths[name]))
    return tmp, dit, paths


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_dit_reads(monkeypatch):
    """Fails the test if any tensor of the DiT is read through StateDictFile.get or .read: the heavy part of a merge
    (the LoRA's own tensors, a small file, may be read either way)."""
    def guarded(original):
        def read(self, key, *args, **kwargs):
            if self.path.name == "dit.safetensors":
                raise AssertionError(f"{self.path}: {key} was read before the LoRA was checked")
            return original(self, key, *args, **kwargs)
        return read

    monkeypatch.setattr(StateDictFile, "read", guarded(StateDictFile.read))
    monkeypatch.setattr(StateDictFile, "get", guarded(StateDictFile.get))


def test_merge_refuses_a_nan_lora_naming_the_file_and_key_before_reading_the_dit(files, capsys, tmp_path, no_dit_reads):
    _, dit, paths = files
    out = tmp_path / "merged.safetensors"
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths["good"], paths["nan"], "--save_merged_model", out,
                                           "--device", "cpu"], capsys)
    assert status == 2
    assert error_line(err) == f"error: {paths['nan']}: {NAN_KEY} holds NaN or infinite values (a diverged training?): this LoRA cannot be applied"
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_ranks_that_disagree(files, capsys, tmp_path, no_dit_reads):
    _, dit, paths = files
    argv = ["--dit", dit, "--lora_weight", paths["ranks"], "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    assert status == 2
    assert error_line(err).startswith(f"error: {paths['ranks']}: {RANK_KEY}.lora_")
    assert "have different ranks" in err and "--allow_partial_lora" in err


def test_allow_partial_lora_merges_the_rest_and_lists_what_it_drops(files, capsys, tmp_path, caplog):
    _, dit, paths = files
    out = tmp_path / "m.safetensors"
    argv = ["--dit", dit, "--lora_weight", paths["tucker"], "--save_merged_model", out, "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    assert status == 2 and ("lora_unet_double_blocks_0_img_attn_proj.hada_t1: a LoHa/LoKr Tucker core (of a convolution), which this "
                            "toolkit does not apply") in error_line(err)
    assert not out.exists()
    status, stdout, _ = run_main(merge_lora.main, [*argv, "--allow_partial_lora"], capsys)
    assert status == 0 and out.is_file() and "into 20 layers" in stdout
    assert "--allow_partial_lora drops 1 entries:\n  lora_unet_double_blocks_0_img_attn_proj.hada_t1: a LoHa/LoKr Tucker" in caplog.text


def test_convert_refuses_what_it_cannot_convert(files, capsys, tmp_path):
    _, _, paths = files
    status, _, err = run_main(convert_lora.main, ["--input", paths["nan"], "--output", tmp_path / "o.safetensors", "--target", "other"], capsys)
    assert status == 2 and NAN_KEY in error_line(err) and not (tmp_path / "o.safetensors").exists()


@pytest.fixture(scope="module")
def generation_files(files, encoders_and_vae):
    tmp, _, _ = files
    config = tiny_dit_config()
    return {"dit": write_dit(tmp / "mp_rank_00_model_states.pt", random_dit_state_dict(config, seed=3, scale=0.05), config, "pt"),
            **encoders_and_vae}


OTHER_SIZE = "double_blocks.1.img_mlp.fc2 is [128, 256] in the LoRA but [64, 256] in"


@pytest.mark.parametrize("bad, named", [("nan", f"{NAN_KEY} holds NaN or infinite values"), ("diverged", DIVERGED),
                                        ("ranks", f"{RANK_KEY}.lora_up.weight: its up weight [64, 4] and down weight [8, 256]"),
                                        ("other size", OTHER_SIZE)])
@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]], ids=["run", "dry run"])  # a --dry_run passed every LoRA file
def test_generation_refuses_a_bad_lora_before_the_text_encoders_run(files, generation_files, capsys, tmp_path, monkeypatch, bad, named,
                                                                    dry_run):
    from musubi_tuner.hunyuan import text_encoders

    monkeypatch.setattr(text_encoders, "load_text_encoder1", lambda *a, **k: pytest.fail("a text encoder was loaded"))
    _, _, paths = files
    g = generation_files
    argv = ["--dit", g["dit"], "--vae", g["vae"], "--text_encoder1", g["te1"], "--text_encoder2", g["te2"], "--prompt", "a cat",
            "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2", "--save_path", tmp_path / "out",
            "--lora_weight", paths["good"], paths[bad], "--fp8", *dry_run]
    status, _, err = run_main(hv_generate_video.main, argv, capsys)
    assert status == 2 and error_line(err).startswith(f"error: {paths[bad]}: ") and named in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("bad, named", [("nan", NAN_KEY), ("diverged", DIVERGED), ("ranks", f"{RANK_KEY}.lora_up.weight"),
                                        ("bias diff", "lora_unet_double_blocks_0_img_attn_proj.diff_b: a diff_b of "
                                                      "double_blocks.0.img_attn_proj.bias, but a network holds LoRA, LoHa or LoKr modules"),
                                        ("other size", "[128, ")])
@pytest.mark.parametrize("flag", ["--network_weights", "--base_weights"])
@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]], ids=["run", "dry run"])  # --base_weights of another size passed a --dry_run
def test_training_refuses_a_bad_lora_before_loading_anything(files, capsys, tmp_path, bad, named, flag, dry_run):
    _, dit, paths = files
    if flag == "--base_weights" and bad == "bias diff":
        return  # a bias diff merges into the base: nothing to refuse
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\nresolution = [64, 64]\n")
    argv = ["--dit", dit, "--dataset_config", toml, "--sdpa", "--network_module", "networks.lora", "--output_dir", tmp_path / "out",
            "--output_name", "x", flag, paths[bad], *dry_run]
    status, _, err = run_main(hv_train_network.main, argv, capsys)
    assert status == 2 and error_line(err).startswith(f"error: {paths[bad]}: ") and named in err


WIDTH = "double_blocks.1.img_mlp.fc2 is [128, 256] in the LoRA but [64, 256] in the DiT (a LoRA for another model size?)"


@pytest.mark.parametrize("bad, module, dim_from_weights, line", [
    ("other size", "networks.lora", True, WIDTH),
    ("other size", "networks.lora", False, WIDTH),  # the rank is the file's: the width was blamed on the rank
    ("lokr other size", "networks.lokr", True, WIDTH),
    ("extra block", "networks.lora", True, "lora_unet_double_blocks_5_img_attn_proj.lora_down.weight: module "
                                           "double_blocks.5.img_attn_proj is no Linear layer of this DiT (a LoRA for another model?)"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]], ids=["run", "dry run"])
def test_training_from_a_lora_of_another_width_names_the_layer_as_merging_does(files, capsys, tmp_path, bad, module,
                                                                               dim_from_weights, line, dry_run):
    """fuzz_aw 13: with --dim_from_weights a layer of another width was a size-mismatch traceback (a --dry_run too),
    and without it the message blamed the rank, which was the file's."""
    _, dit, paths = files
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\nresolution = [64, 64]\n")
    argv = ["--dit", dit, "--dataset_config", toml, "--sdpa", "--network_module", module, "--network_dim", "4", "--output_dir",
            tmp_path / "out", "--output_name", "x", "--network_weights", paths[bad], *dry_run,
            *(["--dim_from_weights"] if dim_from_weights else [])]
    status, _, err = run_main(hv_train_network.main, argv, capsys)
    assert status == 2 and error_line(err) == f"error: {paths[bad]}: {line}", err


def test_info_and_doctor_report_a_nan_lora(files, capsys):
    _, _, paths = files
    status, out, err = run_main(lora_info.main, [paths["nan"]], capsys)
    assert status == 0 and "Traceback" not in err
    assert f"NOT FINITE {NAN_KEY} holds NaN or infinite values" in out and "not finite" in out  # and in the block norms
    status, out, err = run_main(lora_info.main, [paths["nan"], "--json"], capsys)
    assert status == 0 and json.loads(out)["modules"]
    status, out, _ = run_main(lora_doctor.main, [paths["nan"], "--for", "ours", "comfyui"], capsys)
    assert status == 1 and f"{NAN_KEY} holds NaN or infinite values" in out and "it holds NaN or infinite values" in out
    rows = [line for line in out.splitlines() if "keys applied" not in line and re.search(r"\d+/\d+\s+\d+%", line)]
    assert rows and all(line.endswith("none: the file holds NaN or infinite values") for line in rows), out  # not "give it"
    status, out, _ = run_main(lora_doctor.main, [paths["nan"], "--json"], capsys)
    assert status == 1 and json.loads(out)["non_finite"] == NAN_KEY


def test_every_reader_refuses_a_diverged_training_s_lora_and_info_and_the_doctor_say_so(files, capsys, tmp_path, no_dit_reads):
    """Finite weights of 1e30 were saved by a diverged training, called good, and applied by generation (a video of
    noise): the update they make is held to what a trained LoRA's can be, by the one reader every tool uses."""
    _, dit, paths = files
    weights = StateDictFile(paths["diverged"]).load_all()
    module = NAN_KEY.removesuffix(".lora_up.weight")
    up, down, alpha = weights[NAN_KEY].double(), weights[f"{module}.lora_down.weight"].double(), float(weights[f"{module}.alpha"])
    largest = float((up @ down).abs().max()) * alpha / down.shape[0]  # the largest change to one weight
    message = (f"error: {paths['diverged']}: single_blocks.1.linear1: its update reaches {largest:.3g} per weight, where a "
               "trained LoRA's stays well below 1 (a diverged training): this LoRA cannot be applied")
    for main, argv in ((merge_lora.main, ["--dit", dit, "--lora_weight", paths["diverged"], "--save_merged_model", tmp_path / "m.safetensors",
                                          "--device", "cpu"]),
                       (convert_lora.main, ["--input", paths["diverged"], "--output", tmp_path / "o.safetensors", "--target", "other"])):
        status, _, err = run_main(main, argv, capsys)
        assert status == 2 and error_line(err) == message
    assert list(tmp_path.iterdir()) == []
    status, out, err = run_main(lora_info.main, [paths["diverged"]], capsys)
    assert status == 0 and f"DIVERGED   single_blocks.1.linear1: its update reaches {largest:.3g} per weight" in out, out
    status, out, _ = run_main(lora_doctor.main, [paths["diverged"], "--for", "ours", "comfyui"], capsys)
    rows = [line for line in out.splitlines() if "keys applied" not in line and re.search(r"\d+/\d+\s+\d+%", line)]
    assert status == 1 and rows and all(line.endswith("none: the file holds a diverged training's update") for line in rows), out
    status, out, _ = run_main(lora_doctor.main, [paths["diverged"], "--json"], capsys)
    assert status == 1 and json.loads(out)["diverged"].startswith(f"single_blocks.1.linear1: its update reaches {largest:.3g}")


@pytest.mark.parametrize("past", ["alpha", "factors"])
def test_float64_values_past_float32_are_refused_by_every_reader_and_reported_by_info_and_the_doctor(files, capsys, tmp_path, past):
    """float64 entries that float32, where every program applies a LoRA, cannot hold: an alpha of 1e300 (merging
    failed with a traceback, lora_info with an OverflowError), or a pair scaled 1e200 up and 1e-200 down, whose update
    is the trained one in float64 (the bound of the update was NaN and passed: convert_lora and lora_post_hoc_ema wrote
    files holding inf, merging blamed the sum)."""
    from musubi_tuner import lora_post_hoc_ema

    tmp, dit, paths = files
    weights = StateDictFile(paths["good"]).load_all()
    module = NAN_KEY.removesuffix(".lora_up.weight")
    if past == "alpha":
        key, changed = f"{module}.alpha", {f"{module}.alpha": torch.tensor(1e300, dtype=torch.float64)}
    else:
        key, changed = NAN_KEY, {NAN_KEY: weights[NAN_KEY].double() * 1e200,
                                 f"{module}.lora_down.weight": weights[f"{module}.lora_down.weight"].double() * 1e-200}
    bad = tmp_path / "f64.safetensors"
    save_file({**weights, **changed}, str(bad))
    largest = float(changed[key].abs().max())
    why = f"{key} holds values up to {largest:.3g}, past float32's range (3.4e+38), in which LoRAs are applied"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for main, argv in ((merge_lora.main, ["--dit", dit, "--lora_weight", bad, "--save_merged_model", out_dir / "m.safetensors", "--device", "cpu"]),
                       (convert_lora.main, ["--input", bad, "--output", out_dir / "o.safetensors", "--target", "other"]),
                       (lora_post_hoc_ema.main, [paths["good"], bad, "--no_sort", "--output_file", out_dir / "e.safetensors"])):
        status, _, err = run_main(main, argv, capsys)
        assert status == 2 and error_line(err) == f"error: {bad}: {why} (a diverged training?): this LoRA cannot be applied"
    assert list(out_dir.iterdir()) == []
    status, out, err = run_main(lora_info.main, [bad], capsys)
    assert status == 0 and f"NOT FINITE {why}: merging and generation refuse this file" in out and "Traceback" not in err
    status, out, _ = run_main(lora_doctor.main, [bad, "--for", "ours"], capsys)
    assert status == 1 and "none: the file holds values past float32's range" in out, out


@pytest.mark.parametrize("command", ["merge", "generate"])
def test_a_multiplier_that_makes_the_update_a_diverged_training_s_is_refused_before_the_work(files, generation_files, capsys,
                                                                                             tmp_path, command):
    """merge_lora --lora_multiplier 1e30 wrote a DiT of 1e27 weights with a warning, and generation with it sampled noise
    and blamed the files."""
    _, dit, paths = files
    g = generation_files
    if command == "merge":
        main, argv = merge_lora.main, ["--dit", dit, "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    else:
        main, argv = hv_generate_video.main, ["--dit", g["dit"], "--vae", g["vae"], "--text_encoder1", g["te1"], "--text_encoder2",
                                              g["te2"], "--prompt", "a cat", "--video_size", "32", "32", "--video_length", "5",
                                              "--infer_steps", "2", "--save_path", tmp_path / "out"]
    status, _, err = run_main(main, [*argv, "--lora_weight", paths["good"], "--lora_multiplier", "1e30"], capsys)
    assert status == 2, err[-2000:]
    line = error_line(err)
    assert re.fullmatch(rf"error: {re.escape(str(paths['good']))}: \S+: with the multiplier 1e\+30 its update reaches \S+ per "
                        r"weight, where a trained LoRA's stays well below 1: the output would be noise; use a multiplier near 1",
                        line), line
    assert not (tmp_path / "m.safetensors").exists() and not list((tmp_path / "out").glob("*"))
    status, _, _ = run_main(merge_lora.main, ["--dit", dit, "--save_merged_model", tmp_path / "m2.safetensors", "--device", "cpu",
                                              "--lora_weight", paths["good"], "--lora_multiplier", "-2"], capsys)
    assert status == 0 and (tmp_path / "m2.safetensors").is_file()  # a multiplier people use is not refused


def test_info_and_doctor_list_entries_we_cannot_apply(files, capsys):
    _, _, paths = files
    status, out, _ = run_main(lora_info.main, [paths["ranks"]], capsys)
    assert status == 0 and "unusable   3 entries this toolkit cannot apply" in out and f"{RANK_KEY}.lora_up.weight: its up weight" in out


def test_a_reader_that_stops_early_ends_info_and_the_doctor_quietly(files):
    """`musubi-lora-info FILE | head`: the pipe closes before the report is written (both commands run at once)."""
    _, _, paths = files
    runs = [subprocess.Popen([sys.executable, "-m", command, str(paths["good"])], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
            for command in ("musubi_tuner.lora_info", "musubi_tuner.lora_doctor")]
    for p in runs:
        p.stdout.close()  # the reader is gone before the command prints
    for p in runs:
        err = p.stderr.read().decode()
        assert p.wait() == 141 and err.strip() == "", err


@pytest.mark.parametrize("encoding", ["utf-8:strict", "ascii"])
def test_a_file_name_stdout_cannot_encode_is_escaped_in_the_report_not_the_report_lost(files, tmp_path, encoding):
    """A name that is not UTF-8 (a zip unpacked on Linux), on a terminal of strict UTF-8 (a desktop's locale) or ASCII:
    info and the doctor (status 1: a LoRA some consumers do not apply whole) printed nothing but "stdout: cannot write the
    report"."""
    import os
    import shutil

    _, _, paths = files
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.safetensors")))
    shutil.copy(paths["good"], odd)
    for command in ("musubi_tuner.lora_info", "musubi_tuner.lora_doctor"):
        done = subprocess.run([sys.executable, "-m", command, str(odd)], cwd=ROOT, capture_output=True,
                              env={"PYTHONPATH": str(ROOT / "src"), "PATH": "", "PYTHONIOENCODING": encoding})
        assert done.returncode in (0, 1) and done.stderr == b"" and done.stdout.startswith(b"caf\\udce9.safetensors"), done.stderr[-1000:]


def test_an_empty_rank_is_refused_by_name_and_reported_by_info(files, capsys, tmp_path):
    _, dit, paths = files
    why = "rank 0: its up and down weights are empty (a damaged file)"
    argv = ["--dit", dit, "--lora_weight", paths["rank zero"], "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    assert status == 2 and error_line(err).startswith(f"error: {paths['rank zero']}: {RANK_KEY}.lora_") and why in err
    status, out, err = run_main(lora_info.main, [paths["rank zero"]], capsys)
    assert status == 0 and why in out + err and "Traceback" not in err


@pytest.mark.parametrize("name", list(EMPTY_LYCORIS))
def test_an_empty_loha_or_lokr_module_is_refused_by_name_and_reported_by_info_and_the_doctor(files, capsys, tmp_path, name):
    """A rank-0 LoHa / LoKr (or an empty lokr_w1) was a ZeroDivisionError / RuntimeError traceback in every reader."""
    _, dit, paths = files
    key, why = EMPTY_WHY[name]
    argv = ["--dit", dit, "--lora_weight", paths[name], "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    assert status == 2 and error_line(err) == (f"error: {paths[name]}: {key}: {why}; --allow_partial_lora applies the rest and "
                                               "lists what it drops"), err
    for main in (lora_info.main, lora_doctor.main):
        status, out, err = run_main(main, [paths[name]], capsys)
        assert status in (0, 1) and why in out + err and "Traceback" not in err, err


@pytest.mark.parametrize("second", ["transformer_blocks.0", "base_model.model.transformer_blocks.0"])
def test_one_diffusers_part_under_two_prefixes_is_refused_naming_both(files, capsys, tmp_path, second):
    """to_q under `transformer.` and under none (or PEFT's base_model.model.) are one part of img_attn_qkv twice: one pair
    was dropped without a word, where the whole-layer namings given twice are refused."""
    _, dit, _ = files
    g = torch.Generator().manual_seed(0)
    first = "transformer.transformer_blocks.0"
    sd = {f"{prefix}.attn.to_q.{ab}.weight": torch.randn(shape, generator=g) * 0.05
          for prefix in (first, second) for ab, shape in (("lora_A", (4, 64)), ("lora_B", (64, 4)))}
    path = tmp_path / "twice.safetensors"
    save_file(sd, str(path))
    argv = ["--dit", dit, "--lora_weight", path, "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    kept, refused = sorted([first, second])  # (safetensors stores its keys sorted: the first read is kept)
    assert status == 2 and error_line(err) == (
        f"error: {path}: {refused}.attn.to_q.lora_A.weight: a second LoRA of the q part of double_blocks.0.img_attn_qkv "
        f"(beside {kept}.attn.to_q.lora_A.weight): the file names that layer twice; "
        "--allow_partial_lora applies the rest and lists what it drops"), err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("name, key, shapes", [("lokr w2 ranks", "lokr_w2_a [16, 4] and lokr_w2_b [3, 64]", "w2"),
                                                ("lokr w1 ranks", "lokr_w1_a [4, 2] and lokr_w1_b [3, 4]", "w1")])
def test_a_lokr_whose_factor_ranks_disagree_is_said_to_be_so(files, capsys, tmp_path, name, key, shapes):
    _, dit, paths = files
    argv = ["--dit", dit, "--lora_weight", paths[name], "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    status, _, err = run_main(merge_lora.main, argv, capsys)
    assert status == 2 and error_line(err) == (f"error: {paths[name]}: {RANK_KEY}.lokr_{shapes}_a: its {key} have different ranks "
                                               "(a damaged or mismatched file); --allow_partial_lora applies the rest and lists what it drops"), err


def test_an_alpha_of_several_values_is_refused_by_name_by_every_reader_of_the_file(files, capsys, tmp_path):
    """The reader refuses it (networks.lora_reader.check_entry_types), so merge, info and the rest say the same line."""
    _, dit, paths = files
    want = f"error: {paths['alpha vector']}: {RANK_KEY}.alpha: its alpha holds 2 values, not one (shape [2]; a damaged file"
    argv = ["--dit", dit, "--lora_weight", paths["alpha vector"], "--save_merged_model", tmp_path / "m.safetensors", "--device", "cpu"]
    for main, args in ((merge_lora.main, argv), (lora_info.main, [paths["alpha vector"]]),
                       (merge_lora.main, [*argv, "--allow_partial_lora"])):
        status, _, err = run_main(main, args, capsys)
        assert status == 2 and error_line(err).startswith(want) and "Traceback" not in err, err


def test_an_fp8_lora_merges_as_the_float_values_it_holds(files, capsys, tmp_path):
    _, dit, paths = files
    merged = {}
    for name in ("fp8", "fp8 as float32"):
        out = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        status, _, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths[name], "--save_merged_model", out, "--device", "cpu"],
                             capsys)
        assert status == 0, err
        merged[name] = StateDictFile(out).load_all()
    assert merged["fp8"].keys() == merged["fp8 as float32"].keys()
    assert all(torch.equal(merged["fp8"][k], merged["fp8 as float32"][k]) for k in merged["fp8"])
