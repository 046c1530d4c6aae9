"""The planner's flags as a user types them: --vram_budget's values, the flags that change nothing, the step cache's warm-up."""

import logging
from pathlib import Path

import pytest

from musubi_tuner.errors import UserError


@pytest.fixture(autouse=True)
def trace_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


PLAN = ["--video_size", "64", "64", "--video_length", "9"]
GENERATE = ["--dit", "dit.pt", "--vae", "vae.pt", "--text_encoder1", "te1", "--text_encoder2", "te2", "--prompt", "a cat",
            "--save_path", "out"]  # parsed only: the files are not opened


@pytest.mark.parametrize("budget", ["0", "0G", ".", "1.2.3", ""])  # as "-1", "nan" and "abc" already were
def test_a_vram_budget_it_cannot_take_is_one_error_line(budget, capsys):
    from musubi_tuner.plan import main

    with pytest.raises(SystemExit) as e:
        main([*PLAN, "--vram_budget", budget])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.strip() == f"error: --vram_budget {budget!r}: give the card's memory, e.g. 12G, 16G, 24G or 80G (read as GiB)"


def test_a_vram_budget_without_dry_run_is_checked_and_said_to_be_ignored(caplog):
    from musubi_tuner import hv_generate_video
    from musubi_tuner.planning.from_args import check_budget_flag
    from musubi_tuner.training.args import build_parser

    common = GENERATE
    for args in (build_parser().parse_args(["--vram_budget", "24G"]),
                 hv_generate_video.build_parser().parse_args([*common, "--vram_budget", "24G"])):
        with caplog.at_level(logging.WARNING):
            check_budget_flag(args)
        assert "--vram_budget 24G acts only with --dry_run (it plans the options that fit; it does not limit a run): ignored" \
            in caplog.text
        caplog.clear()
        args.dry_run = True
        check_budget_flag(args)
        assert caplog.text == ""
        for bad in ("abc", "0", "1.2.3"):
            args.vram_budget = bad
            with pytest.raises(UserError, match=f"--vram_budget '{bad}': give the card's memory"):
                check_budget_flag(args)


TRAIN_IGNORES = {
    "--with_lora": [], "--cfg_parallel": [], "--step_cache": ["teacache"], "--step_cache_threshold": ["0.3"],
    "--step_cache_warmup": ["5"], "--infer_steps": ["3"], "--fp8": [], "--guidance_scale": ["6"], "--split_uncond": [],
    "--vae_chunk_size": ["4"], "--use_pinned_memory_for_block_swap": [],
}
GENERATE_IGNORES = {
    "--network_dim": ["128"], "--optimizer_type": ["adafactor"], "--mixed_precision": ["fp16"], "--fp8_base": [],
    "--gradient_checkpointing": [], "--use_pinned_memory_for_block_swap": [], "--step_cache_threshold": ["0.2"],
    "--step_cache_warmup": ["5"], "--no_vae_tiling": [], "--with_lora": [], "--split_uncond": [], "--cfg_parallel": [],
}


@pytest.mark.parametrize("mode, ignored", [("train", TRAIN_IGNORES), ("generate", GENERATE_IGNORES)])
def test_every_memory_flag_that_changes_nothing_is_named(mode, ignored):
    from musubi_tuner.plan import build_parser, flags_that_change_nothing

    parser = build_parser()
    for flag, values in ignored.items():
        lines = flags_that_change_nothing(parser, parser.parse_args([*PLAN, "--mode", mode, flag, *values]))
        assert len(lines) == 1 and lines[0].startswith(f"{flag} "), (flag, lines)
        assert "ignores it" in lines[0] or "changes nothing" in lines[0]
    # and none for a flag that acts, given with what it needs
    acting = {"train": [["--blocks_to_swap", "4", "--use_pinned_memory_for_block_swap"], ["--network_dim", "8"],
                        ["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"], ["--no_vae_tiling"]],
              "generate": [["--blocks_to_swap", "4", "--use_pinned_memory_for_block_swap"], ["--step_cache", "fbcache", "--step_cache_threshold", "0.1"],
                           ["--guidance_scale", "6", "--split_uncond"], ["--fp8", "--with_lora", "--network_dim", "8"], ["--vae_chunk_size", "4"]]}
    for flags in acting[mode]:
        assert flags_that_change_nothing(parser, parser.parse_args([*PLAN, "--mode", mode, *flags])) == [], flags


def test_the_plan_names_a_flag_another_flag_leaves_without_effect(caplog, capsys):
    from musubi_tuner.plan import main

    with caplog.at_level(logging.WARNING):
        main([*PLAN, "--no_vae_tiling", "--vae_spatial_tile_sample_min_size", "128"])
    assert "[cache_latents, --vae_tiling]" in capsys.readouterr().out
    assert "--no_vae_tiling changes nothing in this plan of training with the other flags given (training: plan cache_latents " \
           "without --vae_tiling, which the plan assumes; a tile size turns it on" in caplog.text


def test_the_plan_skips_no_more_steps_than_the_warmup_leaves(capsys):
    from musubi_tuner.plan import main

    gen = [*PLAN, "--mode", "generate", "--step_cache", "teacache"]
    main([*gen, "--step_cache_warmup", "100"])
    out = capsys.readouterr().out
    assert "options: --step_cache teacache --step_cache_warmup 100" in out
    assert "0 of 50 steps skipped (1x: capped: the first 100 steps (--step_cache_warmup) and the last always run)" in out
    main([*gen, "--step_cache_warmup", "45"])  # 50 - 45 - 1 = 4 of the 19 the published 1.6x would skip
    assert "4 of 50 steps skipped (1.09x: capped" in capsys.readouterr().out
    main([*gen, "--step_cache_warmup", "2"])  # the published figure when the warm-up leaves enough
    assert "19 of 50 steps skipped (1.6x: published figure" in capsys.readouterr().out


def test_generation_warns_before_the_run_when_the_warmup_leaves_no_step_to_skip(caplog):
    from musubi_tuner import hv_generate_video
    from musubi_tuner.inference import step_cache

    parser = hv_generate_video.build_parser()
    common = [*GENERATE, "--step_cache", "teacache"]
    for steps, warmup in ((3, 10), (3, 2), (50, 49)):
        with caplog.at_level(logging.WARNING):
            step_cache.check_args(parser.parse_args([*common, "--infer_steps", str(steps), "--step_cache_warmup", str(warmup)]))
        assert (f"--step_cache_warmup {warmup} with --infer_steps {steps}: the first {warmup} steps and the last always run, "
                "so --step_cache teacache can skip no step") in caplog.text
        caplog.clear()
    step_cache.check_args(parser.parse_args([*common, "--infer_steps", "3", "--step_cache_warmup", "1"]))
    assert caplog.text == ""
    with pytest.raises(UserError, match="--step_cache_warmup needs --step_cache"):  # (without the cache: fuzz_ap 8)
        step_cache.check_args(parser.parse_args([*GENERATE, "--infer_steps", "3", "--step_cache_warmup", "10"]))
    with pytest.raises(UserError, match="--step_cache_threshold needs --step_cache"):  # the values are checked as before
        step_cache.check_args(parser.parse_args([*GENERATE, "--step_cache_threshold", "0.2"]))


def test_the_planner_holds_the_rank_to_the_trainer_s_bound(capsys):
    """--network_dim 2**62 was a traceback in the planner, after the trainer's flag got its bound."""
    from musubi_tuner.plan import main

    with pytest.raises(SystemExit) as e:
        main([*PLAN, "--network_dim", str(2**62)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith(
        f"error: --network_dim {2**62}: must be between 1 and 1048576 (HunyuanVideo's layers are 3,072 wide")


def trainer_dry_run_argv(tmp_path, general: str = "", dataset: str = "") -> list[str]:
    """The trainer's --dry_run on the tiny DiT and a dataset config of `dataset`'s lines (an image folder by default)."""
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    config = tiny_dit_config()
    dit = write_dit(tmp_path / "dit.safetensors", random_dit_state_dict(config), config)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\n{general}\n[[datasets]]\n'
                    + (dataset or f'image_directory = "{(tmp_path / "images").as_posix()}"\n'))
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora",
            "--output_dir", str(tmp_path / "out"), "--output_name", "x", "--dry_run"]


def test_a_batch_the_planner_cannot_trace_is_refused_by_the_planner_and_capped_in_the_trainer_s_dry_run(tmp_path, capsys, caplog):
    """A batch of 2**62 ended in 'out of host memory' (the trace holds an int per sample). plan.py refuses it as its
    flag; a dataset TOML's batch_size, which a real run takes (a batch holds at most one bucket's items), is planned
    at the planner's bound, with a warning."""
    from musubi_tuner import hv_train_network
    from musubi_tuner.plan import main

    with pytest.raises(SystemExit) as e:
        main([*PLAN, "--batch_size", str(2**62)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith(f"error: --batch_size {2**62}: must be between 1 and 65536")

    hv_train_network.main(trainer_dry_run_argv(tmp_path, general=f"batch_size = {2**62}\n"))
    assert "train at 64x64x1f, batch 65536," in capsys.readouterr().out
    assert f"batch_size {2**62:,} is planned as 65,536 samples, the most the planner plans" in caplog.text


def test_the_trainers_dry_run_plans_a_full_extraction_at_max_frames(tmp_path, capsys):
    """fuzz_af 6: frame_extraction = "full" (the whole video, at most max_frames) was planned at target_frames, which it
    does not read, 1 frame by default: 17.2 GB planned for a full-size step of 35.8 GB."""
    from musubi_tuner import hv_train_network

    hv_train_network.main(trainer_dry_run_argv(tmp_path, dataset=f'video_directory = "{(tmp_path / "videos").as_posix()}"\n'
                                                                 'frame_extraction = "full"\nmax_frames = 31\n'))
    assert "train at 64x64x29f, batch 1," in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--optimizer_type", "Foo"], "--optimizer_type Foo is unknown"),
    (["--optimizer_args", "lr=0.1"], "--optimizer_args lr=0.1: set the learning rate with --learning_rate"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.Nope"], "--lr_scheduler_type torch.optim.lr_scheduler.Nope"),
    (["--log_with", "tensorboard"], "--log_with tensorboard needs --logging_dir"),
])
def test_the_trainers_dry_run_refuses_the_optimizer_schedule_and_trackers_the_run_refuses(tmp_path, capsys, flags, message):
    """fuzz_al 2: the dry run printed a plan and exited 0 for flags the run refuses in its first seconds."""
    from musubi_tuner import hv_train_network

    with pytest.raises(SystemExit) as e:
        hv_train_network.main([*trainer_dry_run_argv(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_trainers_dry_run_says_the_schedule_flags_it_ignores(tmp_path, capsys, caplog):
    from musubi_tuner import hv_train_network

    hv_train_network.main([*trainer_dry_run_argv(tmp_path), "--lr_scheduler_num_cycles", "5"])
    assert "train at 64x64x1f" in capsys.readouterr().out and "--lr_scheduler_num_cycles" in caplog.text


def test_the_trainers_dry_run_plans_a_larger_validation_batch(tmp_path, capsys, caplog):
    """fuzz_ak 9: only the training datasets were planned; a [[validation_datasets]] batch of 8 at 1280x720x9f ran out
    of memory at the first validation, after a plan that fitted."""
    from musubi_tuner import hv_train_network

    held = (f'\n[[validation_datasets]]\nvideo_directory = "{(tmp_path / "videos").as_posix()}"\nresolution = [128, 96]\n'
            'target_frames = [9]\nbatch_size = 8\n')
    argv = trainer_dry_run_argv(tmp_path)
    toml = Path(argv[argv.index("--dataset_config") + 1])
    hv_train_network.main(argv)
    assert "train at 64x64x1f, batch 1," in capsys.readouterr().out
    toml.write_text(toml.read_text() + held)
    hv_train_network.main(argv)
    assert "train at 96x128x9f, batch 8," in capsys.readouterr().out
    assert "dataset.toml: [[validation_datasets]][0]: its batch is the largest, planned as a training step" in caplog.text


def test_the_trainers_dry_run_plans_caching_tiled_and_both_dry_runs_end_1_when_nothing_fits(tmp_path, capsys):
    """fuzz_af 1: the trainer's own --vae_tiling (its samples' decode, off by default) was read as cache_latents' tiling:
    an untiled encode was planned, 39.7 GB where plan.py said 15.5. fuzz_af 2: a --dry_run --vram_budget that found
    nothing fitting ended 0 (plan.py ends 1)."""
    from musubi_tuner import hv_generate_video, hv_train_network

    train = trainer_dry_run_argv(tmp_path)
    dit = train[1]
    hv_train_network.main(train)
    assert "[cache_latents, --vae_tiling]" in capsys.readouterr().out
    for main, argv in ((hv_train_network.main, train),
                       (hv_generate_video.main, ["--dit", dit, "--vae", dit, "--text_encoder1", str(tmp_path), "--text_encoder2", str(tmp_path),
                                                 "--prompt", "a cat", "--save_path", str(tmp_path / "v"), "--dry_run"])):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--vram_budget", "0.5G"])
        assert e.value.code == 1 and "nothing fits" in capsys.readouterr().out


def test_the_trainers_dry_run_plans_an_optimizer_the_planner_does_not_model_with_adamws_state(tmp_path, capsys, caplog):
    """fuzz_af 11: --optimizer_type SGD (which the run trains with) ended the dry run with "the planner models adamw, ...",
    the rest of its checks lost; musubi-tuner's full name of a modelled one (bitsandbytes.optim.AdamW8bit) too."""
    from musubi_tuner import hv_train_network

    train = trainer_dry_run_argv(tmp_path)
    for optimizer, planned in (("SGD", "adamw"), ("bitsandbytes.optim.AdamW8bit", "adamw8bit")):
        hv_train_network.main([*train, "--optimizer_type", optimizer])
        assert f"(LoRA rank 4, {planned}," in capsys.readouterr().out
    assert "--optimizer_type SGD is not one the planner models (adamw, adamw8bit, adafactor): its state is planned as AdamW's" in caplog.text
    assert "AdamW8bit is not one" not in caplog.text


def test_plan_takes_a_gpu_name_in_any_case_and_refuses_speeds_no_hardware_has(capsys):
    """fuzz_af 13: --gpu H100 was an invalid choice (the names are read lowercased); fuzz_ab 17: --tflops 1e-300 printed
    times as 300-digit numbers of hours."""
    from musubi_tuner.plan import main

    main([*PLAN, "--gpu", "H100"])
    assert "H100" in capsys.readouterr().out
    for flag in ("--tflops", "--pcie_gbps", "--link_gbps"):
        with pytest.raises(SystemExit) as e:
            main([*PLAN, flag, "1e-300"])
        assert e.value.code == 2 and f"error: {flag} 1e-300: must be between 0.1 and" in capsys.readouterr().err


def test_a_size_plan_cannot_take_is_refused_naming_video_size(capsys):
    """fuzz_af 13: "video size 540x960: height and width must be multiples of 16", no flag named (generation named it)."""
    from musubi_tuner.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--video_size", "540", "960", "--video_length", "9"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --video_size 540 960: height and width must be multiples of 16 (try 544 960)"


@pytest.mark.parametrize("module", ["musubi_tuner.plan", "musubi_tuner.hv_generate_video"])
def test_help_after_a_size_no_run_takes_is_the_help(module, capsys):
    """fuzz_au 10: `--video_size 72 64 --help` printed the size's error, not the help asked for."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--video_size", "72", "64", "--help"])
    assert e.value.code == 0 and "--video_size HEIGHT WIDTH" in capsys.readouterr().out


def test_the_plan_refuses_the_swap_counts_and_kernels_the_run_refuses(tmp_path, capsys):
    """fuzz_af 5: --blocks_to_swap 37 (training takes at most 36) was planned with a warning, 4 on a DiT that swaps at
    most 3 planned by the dry run the run then refused, and the budget search proposed counts up to 38 whatever the
    model. fuzz_af 7: --attn_mode sageattn (no backward) was planned for training."""
    from musubi_tuner import hv_generate_video
    from musubi_tuner.demo.tiny_dit import tiny_dit_config
    from musubi_tuner.hunyuan.offload import swap_limit
    from musubi_tuner.plan import main
    from musubi_tuner.planning.options import MemoryOptions, Workload
    from musubi_tuner.planning.planner import fit_budget
    from musubi_tuner.planning.timing import gpu

    for argv, message in (([*PLAN, "--blocks_to_swap", "37", "--gradient_checkpointing"],
                           "--blocks_to_swap 37: must be between 0 and 36 for this model in training"),
                          ([*PLAN, "--attn_mode", "sageattn"],
                           "--attn_mode sageattn is for inference only (it has no backward): a training step takes sdpa, "
                           "flash, flash3 or xformers")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"
    train = trainer_dry_run_argv(tmp_path)
    dit = train[1]
    with pytest.raises(SystemExit) as e:
        hv_generate_video.main(["--dit", dit, "--vae", dit, "--text_encoder1", str(tmp_path), "--text_encoder2", str(tmp_path),
                                "--prompt", "a cat", "--save_path", str(tmp_path / "v"), "--blocks_to_swap", "4", "--dry_run"])
    assert e.value.code == 2 and "--blocks_to_swap 4: must be between 0 and 3 for this model" in capsys.readouterr().err
    config = tiny_dit_config()
    search = fit_budget(Workload(config, 64, 64, 9, mode="generate"), MemoryOptions(), 1e-3, gpu("h100"))
    assert swap_limit(config) == 3 and max(c.options.blocks_to_swap for c in search.ruled_out) <= 3


def test_the_plan_times_an_alias_as_its_kernel_and_an_unnamed_gpu_at_the_default_share(capsys):
    """fuzz_af 7: --attn_mode torch (sdpa under another name) was timed 1.55x slower than sdpa on an H100. fuzz_af 8:
    --tflops without --gpu took the share of peak of the card the budget implied, so one GPU's time changed 1.6x
    between a 24G and a 25G budget, and the share was called learnt from published times."""
    import re

    from musubi_tuner.plan import main

    def step_time(*flags):
        main(["--mode", "generate", *flags])
        out = capsys.readouterr().out
        return re.search(r"time per denoising step on (.*): ([0-9.]+) s =", out).groups()

    assert step_time("--gpu", "h100", "--attn_mode", "torch") == step_time("--gpu", "h100", "--attn_mode", "sdpa")
    (label24, t24), (_, t25) = step_time("--tflops", "100", "--vram_budget", "24G"), step_time("--tflops", "100", "--vram_budget", "25G")
    assert t24 == t25 and "40% of it with sdpa attention, a default share: no published time is of this GPU" in label24


def test_the_generation_plan_decodes_in_the_vae_dtype_given(capsys):
    """fuzz_af 3: --vae_dtype float32 (the advice when float16 overflows) was planned as float16, half what it needs."""
    import re

    from musubi_tuner import hv_generate_video
    from musubi_tuner.planning.from_args import options_from_args

    def decode_gb(dtype):
        main_args = ["--mode", "generate", "--video_size", "256", "256", "--video_length", "17", "--vae_dtype", dtype]
        from musubi_tuner.plan import main

        main(main_args)
        return float(re.search(rf"VAE decode \(tiles of 256 px, {dtype}\) +([0-9.]+) GB", capsys.readouterr().out).group(1))

    assert decode_gb("fp32") > 1.8 * decode_gb("fp16")
    args = hv_generate_video.build_parser().parse_args([*GENERATE, "--vae_dtype", "float32"])
    assert options_from_args(args, "generate").vae_dtype == "fp32"


def test_the_plan_takes_the_lora_rank_from_the_files_that_decide_it(tmp_path, capsys):
    """fuzz_af 4: --dim_from_weights was planned at --network_dim (4 unset), and generation's --lora_weight files beside
    fp8 weights as one LoRA of rank 32; the files' ranks are planned (a file's companion copy once)."""
    from musubi_tuner import hv_generate_video, hv_train_network
    from musubi_tuner.networks.lora_files import lora_outputs, save_lora
    from tests.helpers import tiny_dit_file_and_lora

    paths = []
    for rank in (8, 16):
        folder = tmp_path / f"r{rank}"
        folder.mkdir()
        _, weights, _ = tiny_dit_file_and_lora(folder, rank=rank)
        for output in lora_outputs(weights, folder / "x.safetensors", "both"):
            save_lora(output.tensors, output.path, {})
            paths.append(str(output.path))
    train = trainer_dry_run_argv(tmp_path)
    hv_train_network.main([*train, "--network_weights", paths[0], "--dim_from_weights"])
    assert "(LoRA rank 8, adamw, bf16)" in capsys.readouterr().out
    hv_generate_video.main(["--dit", train[1], "--vae", train[1], "--text_encoder1", str(tmp_path), "--text_encoder2", str(tmp_path),
                            "--prompt", "a cat", "--save_path", str(tmp_path / "v"), "--fp8", "--lora_weight", *paths, "--dry_run"])
    assert "options: --fp8  (LoRAs of rank 24 in all beside the fp8 weights)" in capsys.readouterr().out


def test_a_plan_that_cannot_be_written_is_the_commands_error():
    """fuzz_ah 8: plan and both --dry_runs ended 0 with a warning when stdout was full: their report is their result (a
    script `plan > plan.txt && use plan.txt` went on with an empty or cut file)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "musubi_tuner.plan", "--video_size", "64", "64", "--video_length", "9"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().endswith("error: stdout: cannot write the report (No space left on device)")
    # (a closed stdout is the user's choice to drop the report, as for lora_info: tests/test_streams.py)


def test_the_trainers_dry_run_says_how_to_plan_its_samples(tmp_path, capsys, caplog):
    """fuzz_af 16: a 256x256 training planned at 30.7 GB would take a 720p CFG sample at ~49 GB while training, and the
    dry run said nothing of the samples."""
    from musubi_tuner import hv_train_network

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --f 5\na dog --w 1280 --h 720 --f 129 --s 30 --l 6 --n ugly\n")
    train = trainer_dry_run_argv(tmp_path)
    hv_train_network.main([*train, "--sample_prompts", str(prompts), "--sample_every_n_steps", "10", "--vae", train[1],
                           "--text_encoder1", str(tmp_path), "--text_encoder2", str(tmp_path)])
    assert ("the samples of --sample_prompts are not in this plan: they run while the LoRA and its optimizer state are held. "
            f"Plan the largest with python -m musubi_tuner.plan --mode generate --dit {train[1]} --video_size 720 1280 "
            "--video_length 129 --infer_steps 30 --guidance_scale 6") in caplog.text


def test_nothing_fits_names_the_stage_that_does_not_and_the_search_keeps_a_given_tile_size(capsys):
    """fuzz_af 10: "nothing fits" said to lower the resolution "(or train on images)" for a 256x256 image generation
    whose LLM stage was what did not fit; fuzz_af 12: the budget search started its VAE tiles at 256 px whatever
    --vae_spatial_tile_sample_min_size was given; fuzz_af 9: 1 step was "0 of 1 skipped" yet 1.6x faster."""
    from musubi_tuner.plan import main

    with pytest.raises(SystemExit):
        main(["--mode", "generate", "--video_size", "256", "256", "--video_length", "1", "--vram_budget", "6G"])
    out = capsys.readouterr().out
    assert "Even so, text encoder 1 (LLM) needs 8.7 GB" in out and "(or train on images)" not in out
    main(["--mode", "generate", "--vae_spatial_tile_sample_min_size", "128", "--vram_budget", "80G"])
    assert "VAE decode (tiles of 128 px, fp16)" in capsys.readouterr().out
    main(["--mode", "generate", "--step_cache", "teacache", "--infer_steps", "1"])
    assert "0 of 1 steps skipped (1x: too few steps for the published 1.6x to skip one)" in capsys.readouterr().out


def test_a_skyreels_generation_is_planned_with_its_preset_as_the_run_gets_it(capsys):
    """fuzz_aj 1: plan --model skyreels-i2v --mode generate planned 1 DiT forward per step, 129 frames and 50 steps;
    hv_generate_video runs SkyReels at real CFG 6.0 (2 forwards), 97 frames, 30 steps. Flags given still win."""
    from musubi_tuner.plan import main

    main(["--model", "skyreels-i2v", "--mode", "generate"])
    out = capsys.readouterr().out
    assert "generate at 544x960x97f" in out and "(2 DiT forward(s)" in out and "30 steps:" in out
    main(["--model", "skyreels-i2v", "--mode", "generate", "--guidance_scale", "1", "--video_length", "33"])
    out = capsys.readouterr().out
    assert "generate at 544x960x33f" in out and "(1 DiT forward(s)" in out and "30 steps:" in out
    main(["--mode", "generate"])  # HunyuanVideo: the plan's own defaults, as before
    out = capsys.readouterr().out
    assert "generate at 544x960x129f" in out and "(1 DiT forward(s)" in out and "50 steps:" in out


def test_the_trainers_dry_run_checks_the_sample_prompts_and_the_input_channels_as_the_run(tmp_path, capsys):
    """fuzz_aj 4: the dry run passed (exit 0) an I2V prompt file without --i and a --dit_in_channels the file does not
    have, both of which the run refuses."""
    from musubi_tuner import hv_train_network
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    train = trainer_dry_run_argv(tmp_path)
    with pytest.raises(SystemExit) as e:
        hv_train_network.main([*train, "--dit_in_channels", "32"])
    assert e.value.code == 2 and "--dit_in_channels 32 was given but this text-to-video DiT takes 16" in capsys.readouterr().err
    config = tiny_dit_config(in_channels=32)
    i2v = write_dit(tmp_path / "i2v.safetensors", random_dit_state_dict(config), config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --f 5\n")
    with pytest.raises(SystemExit) as e:
        hv_train_network.main([*train[:1], str(i2v), *train[2:], "--sample_prompts", str(prompts), "--sample_every_n_steps", "10",
                               "--vae", str(i2v), "--text_encoder1", str(tmp_path), "--text_encoder2", str(tmp_path)])
    assert e.value.code == 2 and (f"{prompts}: an image-to-video DiT needs a first frame for every sample prompt (--i "
                                  "image.png); prompt 1 has none") in capsys.readouterr().err


def test_a_generation_dry_run_plans_the_vae_and_text_encoders_it_is_given(tmp_path, caplog):
    """fuzz_af 15: the dry run planned llava-llama-3-8b, CLIP-L and the official VAE whatever files were given (a 600 kB
    LLM was a 14 GB stage, and drove "needed on the GPU" and the budget search). One it cannot read is said, and the
    reference model planned in its place (a dry run may be made without the files at hand)."""
    from musubi_tuner import hv_generate_video
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
    from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
    from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
    from musubi_tuner.planning.from_args import dry_run

    dit = write_dit(tmp_path / "dit.safetensors", random_dit_state_dict(tiny_dit_config()), tiny_dit_config())
    given = {"--vae": write_vae(tmp_path / "vae.pt", random_vae_state_dict(TINY_VAE)),
             "--text_encoder1": write_tiny_llm_folder(tmp_path / "te1"), "--text_encoder2": write_tiny_clip_folder(tmp_path / "te2")}

    def stages(models: dict) -> dict[str, int]:
        args = hv_generate_video.build_parser().parse_args(
            ["--dit", str(dit), *(str(a) for kv in models.items() for a in kv), "--prompt", "a cat", "--save_path", str(tmp_path / "v"),
             "--video_size", "64", "64", "--video_length", "5", "--dry_run"])
        return {s.name.split(" (")[0].split(" [")[0]: s.device_peak for s in dry_run(args, "generate", out=lambda text: None).stages}

    tiny, reference = stages(given), stages({**given, "--vae": dit, "--text_encoder1": tmp_path / "te2", "--text_encoder2": dit})
    assert all(tiny[name] < 50e6 for name in ("text encoder 1", "text encoder 2", "VAE decode")), tiny
    assert reference["text encoder 1"] > 10e9 and reference["text encoder 2"] > 100e6 and reference["VAE decode"] > 100e6, reference
    assert f"--vae: {dit}: not a VAE" in caplog.text and "the reference model is planned in its place" in caplog.text
    # a config.json the loader refuses (fuzz_au 4: a million layers hung the trace) is said as the loader says it
    import json
    import shutil

    shutil.copytree(given["--text_encoder1"], tmp_path / "te1_bad")
    config = json.loads((tmp_path / "te1_bad" / "config.json").read_text())
    (tmp_path / "te1_bad" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    caplog.clear()
    assert stages({**given, "--text_encoder1": tmp_path / "te1_bad"})["text encoder 1"] > 10e9
    assert "--text_encoder1: " in caplog.text and "the config says 1000000" in caplog.text
