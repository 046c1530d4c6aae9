"""A path beneath a folder the user may not enter (fuzz_aq 9): the line names the folder that refuses, not a folder
beneath it that does not exist, and the flag or dataset key the path came from; it was a bare "PATH: Permission denied".

Run as another user (root reads and writes any folder), so these tests need root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from reliability_cases import train_argv

ROOT = Path(__file__).resolve().parents[2]
USER = 54321


@pytest.fixture(scope="module")
def workplace(assets):
    """A folder another user may use (pytest's are root's alone), with copies of the tiny DiT, the cached dataset and a
    LoRA, and `noperm`: a folder of root's that no one else may enter."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as a user the folder's permissions refuse")
    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
    try:
        os.chmod(folder, 0o755)
        shutil.copy(assets.dit, folder / "dit.pt")
        shutil.copy(assets.lora, folder / "lora.safetensors")
        shutil.copytree(assets.cached.parent, folder / "cached")
        toml = folder / "cached" / "dataset.toml"
        toml.write_text(toml.read_text().replace(str(assets.cached.parent), "cached"))
        (folder / "other.toml").write_text(toml.read_text().replace("cached/cache", str(folder / "noperm" / "cache")))
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, USER, USER)
        (folder / "noperm").mkdir(mode=0o000)
        yield folder
    finally:
        shutil.rmtree(folder)


def run_as_user(command: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HOME": str(cwd), "XDG_CACHE_HOME": str(cwd / ".cache")}
    return subprocess.run([sys.executable, str(ROOT / "src" / "musubi_tuner" / f"{command}.py"), *argv], cwd=cwd, env=env,
                          user=USER, group=USER, extra_groups=[], capture_output=True, text=True, timeout=300)


class Relative:  # what train_argv reads of the assets: the copies, named relative to the workplace
    dit, cached = Path("dit.pt"), Path("cached/dataset.toml")


@pytest.mark.parametrize("command, argv, said", [
    ("hv_train_network", train_argv(Relative, "noperm/a/b"),
     "noperm/a/b: cannot write to this folder (Permission denied); this user may not enter noperm: fix its permissions, or "
     "choose another --output_dir"),
    ("hv_train_network", train_argv(Relative, "out", "--resume", "noperm/st"),
     "noperm/st: cannot read this training state folder (--resume): Permission denied; this user may not enter noperm: fix "
     "its permissions"),
    ("hv_train_network", train_argv(Relative, "out", toml="other.toml"),
     "{here}/noperm/cache: cannot read the caches: this user may not enter {here}/noperm; fix its permissions, or choose "
     "another cache_directory (other.toml: [[datasets]][0])"),
    ("convert_lora", ["--input", "lora.safetensors", "--output", "noperm/sub/c.safetensors", "--target", "other"],
     "noperm/sub: cannot write to this folder (Permission denied); this user may not enter noperm: fix its permissions, or "
     "choose another --output"),
], ids=["output-dir", "resume", "cache-directory", "convert-output"])
def test_a_path_beneath_a_folder_the_user_may_not_enter_names_that_folder_and_the_flag(workplace, command, argv, said):
    done = run_as_user(command, argv, workplace)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == [f"error: {said.format(here=workplace)}"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_a_relative_path_in_a_current_folder_the_user_may_not_enter_names_that_folder(workplace):
    """fuzz_bd 6: started in a folder it may not enter (its permissions changed, or sudo -u from root's home), a relative
    --output_dir blamed itself ("fix the permissions of oc0", a folder that does not exist) and a readable config was
    "cannot read (Permission denied)" without a word of why."""
    here = workplace / "c0"
    here.mkdir(mode=0o000)
    os.chown(here, USER, USER)
    try:
        class Absolute:
            dit, cached = workplace / "dit.pt", workplace / "cached" / "dataset.toml"

        done = run_as_user("hv_train_network", train_argv(Absolute, "oc0"), here)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: oc0: cannot write to this folder (Permission denied); this user may not enter {here}: fix its "
                          "permissions, or choose another --output_dir"], done.stderr[-3000:]
    finally:
        here.rmdir()
