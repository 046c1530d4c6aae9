"""Every flag of musubi-tuner's six HunyuanVideo commands works here as typed there.

The flags, with their kinds and defaults, are data read from musubi-tuner's own parsers
(tests/fixtures/musubi_flags/, with the commit and the script that wrote it). Each one must parse with a value
musubi-tuner takes, default to the same value (or differ for a reason written here), and either be read by this
toolkit's code or say, when given, why it does nothing here.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
from pathlib import Path

import pytest

from conftest import DATA
from musubi_tuner.errors import UserError

FLAGS = json.load(open(os.path.join(DATA, "musubi_flags", "musubi_tuner_flags.json")))
PARSERS = {"cache_latents": "musubi_tuner.cache_latents", "cache_text_encoder_outputs": "musubi_tuner.cache_text_encoder_outputs",
           "hv_train_network": "musubi_tuner.training.args", "hv_generate_video": "musubi_tuner.hv_generate_video",
           "merge_lora": "musubi_tuner.merge_lora", "convert_lora": "musubi_tuner.convert_lora"}
SRC = Path(__file__).resolve().parents[1] / "src" / "musubi_tuner"

# values musubi-tuner takes where a generic one would not do (its help and docs use these)
SAMPLES = {"--video_size": ["544", "960"], "--vae_spatial_tile_sample_min_size": ["256"], "--compile_args": ["inductor", "default", "auto", "False"],
           "--metadata_reso": ["1280,720"], "--optimizer_args": ["weight_decay=0.01"], "--lr_scheduler_args": ["T_max=10"],
           "--network_args": ["rank_dropout=0.1"], "--lr_warmup_steps": ["0.1"], "--lr_decay_steps": ["10%"], "--video_length": ["129"],
           "--block_swap_ring_size": ["3"], "--vae_dtype": ["float16"], "--text_encoder_dtype": ["float16"], "--dit_dtype": ["bfloat16"]}
GENERIC = {"int": "2", "float": "0.5", "str": "x", None: "x"}

# musubi-tuner default -> ours, and why
DEFAULTS_DIFFER = {
    ("hv_train_network", "--dit_in_channels"): "read from the DiT file when not given (16 T2V, 32 SkyReels I2V)",
    ("hv_generate_video", "--lora_multiplier"): "musubi-tuner's scalar default 1.0 fails with a list of LoRAs; here none means 1.0 each",
    ("hv_generate_video", "--video_size"): "the preset's default (256 256 for HunyuanVideo), filled in after the DiT is read",
    ("hv_generate_video", "--video_length"): "the preset's default (129)",
    ("hv_generate_video", "--infer_steps"): "the preset's default (50)",
    ("hv_generate_video", "--guidance_scale"): "the preset's default (1.0 HunyuanVideo, 6.0 SkyReels)",
    ("hv_generate_video", "--embedded_cfg_scale"): "the preset's default (6.0 HunyuanVideo, 1.0 SkyReels)",
    ("hv_generate_video", "--flow_shift"): "the preset's default (7.0)",
    ("hv_generate_video", "--compile_backend"): "inductor once --compile is given: given without it, it is said to be ignored",
    ("hv_generate_video", "--compile_mode"): "default once --compile is given: given without it, it is said to be ignored",
    ("hv_train_network", "--compile_backend"): "inductor once --compile is given: given without it, it is said to be ignored",
    ("hv_train_network", "--compile_mode"): "default once --compile is given: given without it, it is said to be ignored",
    ("hv_generate_video", "--strength"): "0.8, filled in with --video_path: given without it, it is said to be ignored",
    ("merge_lora", "--dit_in_channels"): "read from the DiT file when not given",
    ("merge_lora", "--lora_multiplier"): "none means 1.0 for each file, as musubi-tuner's [1.0] does",
    ("merge_lora", "--device"): "cuda when there is one, else cpu: musubi-tuner's default, resolved when run (the data holds the "
                                "value on the machine that read it)",
    ("cache_latents", "--device"): "cuda when there is one, else cpu (resolved when run)",
    ("cache_text_encoder_outputs", "--device"): "cuda when there is one, else cpu (resolved when run)",
}


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(PARSERS[command]).build_parser()


def required_argv(parser) -> list[str]:
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            argv += [action.option_strings[0], "x" if not action.choices else str(next(iter(action.choices)))]
    return argv


def sample_argv(flag: dict) -> list[str]:
    if flag["kind"] == "switch":
        return [flag["flag"]]
    if flag["flag"] in SAMPLES:
        values = SAMPLES[flag["flag"]]
    elif flag["choices"]:
        values = [str(flag["choices"][-1])]
    elif flag["default"] not in (None, [], "") and not isinstance(flag["default"], list):
        values = [str(flag["default"])]
    else:
        values = [GENERIC.get(flag["type"], "x")]
    return [flag["flag"], *values]


@functools.lru_cache(maxsize=None)
def parser_and_argv(command: str) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = parser_of(command)
    return parser, required_argv(parser)


def our_action(parser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_the_data_says_where_it_was_read():
    assert re.fullmatch(r"[0-9a-f]{40}", FLAGS["commit"]) and set(FLAGS["commands"]) == set(PARSERS)


@pytest.mark.parametrize("command", PARSERS)
def test_every_musubi_tuner_flag_parses_as_typed_there(command):
    parser, argv = parser_and_argv(command)
    wrong = []
    for flag in FLAGS["commands"][command]:
        action = our_action(parser, flag["flag"])
        if action is None:
            wrong.append(f"{flag['flag']}: not a flag here")
            continue
        given = argv
        if flag["flag"] in argv:  # a required flag, given its sample instead (a list flag is refused when given twice)
            at = argv.index(flag["flag"])
            given = argv[:at] + argv[at + 2:]
        try:
            value = getattr(parser.parse_args(given + sample_argv(flag)), action.dest)
        except UserError as e:
            wrong.append(f"{' '.join(sample_argv(flag))}: {e}")
            continue
        if flag["kind"] == "switch" and value is not True:
            wrong.append(f"{flag['flag']} is a switch in musubi-tuner, but here it gives {value!r}")
        elif flag["choices"] and str(value) != str(flag["choices"][-1]):
            wrong.append(f"{' '.join(sample_argv(flag))} gives {value!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", PARSERS)
def test_musubi_tuner_defaults_are_kept_or_differ_for_a_reason(command):
    parser, _ = parser_and_argv(command)
    wrong = []
    for flag in FLAGS["commands"][command]:
        if flag["required"] or (command, flag["flag"]) in DEFAULTS_DIFFER:
            continue
        ours, theirs = our_action(parser, flag["flag"]).default, flag["default"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, theirs))
        if (float(ours) != float(theirs)) if numbers else ours != theirs:
            wrong.append(f"{flag['flag']}: {ours!r} here, {theirs!r} in musubi-tuner")
    assert not wrong, "\n".join(wrong)


@functools.lru_cache(maxsize=None)
def names_read_by_code() -> frozenset[str]:
    """Every name the toolkit's source reads as args.<name> (or pre./a.), getattr(x, "<name>") or ["<name>"]."""
    pattern = re.compile(r"\b(?:args|pre|a)\.(\w+)|getattr\(\w+, \"(\w+)\"|\[\"(\w+)\"\]")
    return frozenset(name for path in SRC.rglob("*.py") for groups in pattern.findall(path.read_text()) for name in groups if name)


@pytest.mark.parametrize("command", PARSERS)
def test_every_musubi_tuner_flag_acts_here_or_says_why_not(command, caplog):
    parser, argv = parser_and_argv(command)
    wrong = []
    for flag in FLAGS["commands"][command]:
        action = our_action(parser, flag["flag"])
        reason = getattr(action, "accepted_only", None)
        if reason is None:
            if action.dest not in names_read_by_code():
                wrong.append(f"{flag['flag']} is parsed but nothing reads args.{action.dest}")
            continue
        caplog.clear()
        parser._told_flags = set()
        with caplog.at_level(logging.WARNING, logger="musubi_tuner"):
            parser.parse_args(argv + sample_argv(flag))
        if reason not in action.help or f"{flag['flag']}: accepted for musubi-tuner command lines, and ignored: {reason}" not in caplog.text:
            wrong.append(f"{flag['flag']} does nothing here and does not say why when given")
    assert not wrong, "\n".join(wrong)
