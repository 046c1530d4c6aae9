"""The commands the studio runs, built from its forms with the commands' own parsers, and the demo's values that
fill the forms when nothing else is configured. Paths a command writes must lie in the workspace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musubi_tuner.errors import UserError
from musubi_tuner.launch import python_command, training_command
from musubi_tuner.ui.forms import command_flags, form_values
from musubi_tuner.ui.workspace import Workspace

# The flags through which each command writes files, which the form marks (the dataset's cache folders are checked
# apart). What is checked is where the command really writes: training joins --output_dir and --output_name, and
# --logging_dir and --log_prefix, and a --config_file may give any of them.
WRITES = {"train": ("output_dir", "output_name", "logging_dir", "log_prefix"), "generate": ("save_path", "save_merged_model"),
          "plan": ()}
IN_WORKSPACE = {"train": ("output_dir", "logging_dir"), "generate": ("save_path", "save_merged_model"), "plan": ()}


def parser_for(command: str) -> argparse.ArgumentParser:
    if command == "train":
        from musubi_tuner.training.args import build_parser
    elif command == "generate":
        from musubi_tuner.hv_generate_video import build_parser
    elif command == "plan":
        from musubi_tuner.plan import build_parser
    else:
        raise UserError(f"unknown command {command!r}: the studio runs train, generate and plan")
    return build_parser()


def build(command: str, values: dict[str, object], workspace: Workspace) -> tuple[list[str], list[str]]:
    """The child process's argv for a filled form, checked by the command's parser, every folder it writes to inside
    the workspace; and `missing_inputs`, which a job may not start with."""
    flags, args = _checked(command, values, workspace)
    return _argv(command, flags, args), missing_inputs(command, args)


def job(command: str, values: dict[str, object], workspace: Workspace) -> tuple[list[str], dict[str, str]]:
    """`build`'s argv, and where the job's files will be, for its page: the LoRA files' folder and stem, or the
    videos' folder (the form parsed once for both)."""
    flags, args = _checked(command, values, workspace)
    missing = missing_inputs(command, args)
    if missing:
        raise UserError("; ".join(missing))
    if command == "train":
        from musubi_tuner.training.args import output_stem

        stem = output_stem(args.output_dir, args.output_name)
        return _argv(command, flags, args), {"output_dir": str(stem.parent), "output_name": stem.name}
    return _argv(command, flags, args), {"save_path": args.save_path}


def _argv(command: str, flags: list[str], args: argparse.Namespace) -> list[str]:
    if command == "train":
        return training_command(flags, mixed_precision=args.mixed_precision or "no", quiet=True)
    if command == "generate":
        return python_command("hv_generate_video.py", flags)
    return [sys.executable, "-m", "musubi_tuner.plan", *flags]


def _checked(command: str, values: dict[str, object], workspace: Workspace) -> tuple[list[str], argparse.Namespace]:
    values = _read_paths_in_workspace(parser_for(command), dict(values), workspace, skip=IN_WORKSPACE[command])
    for name in IN_WORKSPACE[command]:  # relative to the workspace, not to the server's folder
        if str(values.get(name) or "").strip():
            values[name] = str(workspace.writable(str(values[name]).strip(), f"--{name}"))
    flags = command_flags(parser_for(command), values)
    if command == "train":
        from musubi_tuner.training.args import log_folder, output_stem, parse_args

        args = parse_args(flags)  # with its --config_file, as the trainer reads it
        # a --config_file's relative folders are the workspace's too, as the form's are, and go on the command line so
        # that the run writes where the check looked (the trainer would take them from the studio's folder)
        moved = {name: str(workspace.writable(getattr(args, name), f"--{name}")) for name in IN_WORKSPACE[command]
                 if getattr(args, name) and not Path(getattr(args, name)).is_absolute()}
        if moved:
            flags = command_flags(parser_for(command), {**values, **moved})
            args = parse_args(flags)
        if not args.output_dir:
            raise UserError("--output_dir: required here (a folder in the workspace for the LoRA files)")
        workspace.writable(output_stem(args.output_dir, args.output_name or "x"), "--output_dir / --output_name")
        if args.logging_dir:
            workspace.writable(log_folder(args), "--logging_dir / --log_prefix")
        return flags, args
    args = parser_for(command).parse_args(flags)
    for name in IN_WORKSPACE[command]:  # where the command writes, as it parses its command line (fuzz_ac 1: a flag
        if getattr(args, name, None):   # smuggled in another field's words wrote outside the workspace)
            workspace.writable(getattr(args, name), f"--{name}")
    return flags, args


def missing_inputs(command: str, args: argparse.Namespace) -> list[str]:
    """Why each file or folder the command reads (each flag of cli.path's type it does not write) is not there, in the
    commands' words: a missing --dit or --dataset_config was the command's own error, in a failed job seconds after
    Start (fuzz_ao 5). The command box shows them under the command; Start refuses."""
    from musubi_tuner.cli import path
    from musubi_tuner.files import require_present

    problems = []
    for action in parser_for(command)._actions:
        value = getattr(args, action.dest, None)
        if action.type is not path or action.dest in WRITES[command] + IN_WORKSPACE[command] or not value:
            continue
        for one in value if isinstance(value, list) else [value]:
            if _is_resume_auto(action.dest, one):
                continue
            try:
                require_present(one, "folder" if action.dest == "resume" else "file", action.option_strings[0])
            except UserError as e:
                problems.append(str(e))
    return problems


def _is_resume_auto(dest: str, value: str) -> bool:
    """--resume auto: the newest complete state in --output_dir, not a path."""
    return dest == "resume" and value == "auto"


def _read_paths_in_workspace(parser: argparse.ArgumentParser, values: dict[str, object], workspace: Workspace,
                             skip: tuple[str, ...]) -> dict:
    """The form's relative file and folder paths (every flag of cli.path's type: --dataset_config, --lora_weight, ...)
    as the workspace's, the one rule the Dataset page and the written paths follow: they went to the command as typed,
    which read them from the folder the studio was started in, and failed after the start with "not found" (fuzz_ac 5)."""
    from musubi_tuner.cli import path

    def anchored(word: str) -> str:  # (a word that starts with a dash is forms.command_flags' to refuse, as typed)
        return word if word.startswith("-") else workspace.resolve(word)

    for action in parser._actions:  # (argparse keeps no public list of its actions)
        value = values.get(action.dest)
        if action.type is not path or action.dest in skip or not isinstance(value, str) or not value.strip():
            continue  # (the written paths: checked by Workspace.writable, which names them as typed)
        if _is_resume_auto(action.dest, value.strip()):  # (a word, not a folder: it was the workspace's "auto" folder)
            continue
        if action.nargs in ("*", "+"):
            values[action.dest] = "\n".join(anchored(line.strip()) for line in value.splitlines() if line.strip())
        else:
            values[action.dest] = anchored(value.strip())
    return values


def caching_commands(toml: str, vae: str, te1: str, te2: str, workspace: Workspace) -> list[list[str]]:
    """cache_latents.py then cache_text_encoder_outputs.py, as the seed types them; every cache folder of the config
    must lie in the workspace (caching writes there, and deletes stale caches)."""
    from musubi_tuner.data.config import load_dataset_config

    for dataset in load_dataset_config(toml).all_datasets:
        workspace.writable(dataset.cache_directory, f"{dataset.where}.cache_directory")
    return [python_command("cache_latents.py", ["--dataset_config", toml, "--vae", vae, "--vae_chunk_size", "32", "--vae_tiling"]),
            python_command("cache_text_encoder_outputs.py", ["--dataset_config", toml, "--text_encoder1", te1,
                                                             "--text_encoder2", te2, "--batch_size", "16"])]


def with_resume(cmd: list[str], outputs: dict[str, str] | None = None, since: float | None = None) -> list[str]:
    """The same training command, continuing from the newest complete state in its --output_dir (`outputs`); a run that
    itself continued a state (--resume FOLDER, or one of the Hub) and saved none of its own since it started (`since`)
    continues that one again. Replaced by --resume auto, such a run restarted from step 0, and one of the Hub could
    not be resumed at all (--resume auto with --resume_from_huggingface is refused: fuzz_ax 8)."""
    cmd = list(cmd)
    if given_resume(cmd) not in (None, "auto") and not _saved_since(outputs or {}, since):
        return cmd
    if "--resume" in cmd:
        at = cmd.index("--resume")
        del cmd[at:at + 2]
    cmd = [word for word in cmd if word != "--resume_from_huggingface"]  # (it names where --resume X is: gone with it)
    return cmd + ["--resume", "auto"]


def given_resume(cmd: list[str]) -> str | None:
    """The --resume a training command runs with: on its command line, or in its --config_file (read as the trainer
    reads it; the Resume of a run whose config gave it restarted from step 0: fuzz_az 2)."""
    if "--resume" in cmd:
        return next(iter(cmd[cmd.index("--resume") + 1:]), None)
    if "--config_file" not in cmd:
        return None
    from musubi_tuner.training.args import parse_args

    script = next((i for i, word in enumerate(cmd) if word.endswith("hv_train_network.py")), None)
    try:
        return parse_args(cmd[script + 1:]).resume if script is not None else None
    except (UserError, SystemExit):  # (a config that no longer reads: the run says so itself)
        return None


def _saved_since(outputs: dict[str, str], since: float | None) -> bool:
    """Whether the run's --output_dir holds a complete state of its --output_name saved by a process started at `since`
    or later (the run's own; any, without `since`)."""
    from musubi_tuner.training.state import complete_states, read_marker

    if not {"output_dir", "output_name"} <= set(outputs):
        return True
    for folder in complete_states(Path(outputs["output_dir"]), outputs["output_name"]):
        started = read_marker(folder)[1].get("process_started")
        if since is None or (isinstance(started, (int, float)) and started >= since - 1):
            return True
    return False


def demo_values(command: str, workspace: Workspace) -> dict[str, object]:
    """The forms' starting values: the seed's commands on the demo's tiny models and dataset (written on first use)."""
    from musubi_tuner.demo.__main__ import training_flags

    a = workspace.demo_assets()
    models = {"dit": str(a["dit"]), "vae": str(a["vae"]), "text_encoder1": str(a["te1"]), "text_encoder2": str(a["te2"])}
    if command == "train":
        flags = training_flags(a, workspace.root / "output", epochs=2) + [
            "--save_state", "--sample_prompts", str(a["sample_prompts"]), "--sample_every_n_epochs", "1", "--validate_every_n_epochs", "1",
            "--vae", str(a["vae"]), "--text_encoder1", str(a["te1"]), "--text_encoder2", str(a["te2"])]
        return form_values(parser_for("train"), flags)
    if command == "generate":
        flags = ["--dit", models["dit"], "--vae", models["vae"], "--text_encoder1", models["text_encoder1"],
                 "--text_encoder2", models["text_encoder2"], "--prompt", "a red circle moving left on a black background",
                 "--video_size", "128", "128", "--video_length", "9", "--infer_steps", "8", "--seed", "1234",
                 "--attn_mode", "sdpa", "--save_path", str(workspace.root / "videos")]
        return form_values(parser_for("generate"), flags)
    if command == "plan":
        return form_values(parser_for("plan"), ["--gradient_checkpointing", "--fp8_base", "--vram_budget", "24G"])
    raise UserError(f"unknown command {command!r}")


def cache_values(workspace: Workspace) -> dict[str, str]:
    a = workspace.demo_assets()
    return {"toml": str(a["toml"]), "vae": str(a["vae"]), "te1": str(a["te1"]), "te2": str(a["te2"])}


def relative_to(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
