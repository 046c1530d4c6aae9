"""A plain `pip install -e .` in a fresh virtual environment runs the seed's commands up to training, as typed there."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from musubi_tuner.demo.__main__ import commands, write_assets
from musubi_tuner.files import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


def import_bootstrap():
    sys.path.insert(0, str(ROOT))
    try:
        import bootstrap
    finally:
        sys.path.remove(str(ROOT))
    return bootstrap


@pytest.mark.slow
def test_a_plain_install_runs_the_seeds_caching_and_training_commands(tmp_path):
    """The environment is made the way bootstrap.py makes it (PyTorch first, then the package), with no extras and
    nothing from the environment running the tests: the seed's `--optimizer_type adamw8bit` must work from the core
    dependencies alone. Minutes: a real install, from pip's cache where it has the wheels."""
    bootstrap = import_bootstrap()
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    python = str(bootstrap.venv_python(venv_dir))
    bootstrap.install(python, extra=None)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["ACCELERATE_USE_CPU"] = "1"
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('diffusers') is None, u.find_spec('bitsandbytes') is not None)"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True", "True"]  # the test extras stayed out; bitsandbytes came with the package

    work = tmp_path / "demo"
    assets = write_assets(work, frames=5)
    for title, cmd in commands(assets, work, epochs=1)[:3]:  # cache latents, cache text, train (the seed's flags)
        result = subprocess.run([python, *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{title} failed after a plain install:\n{result.stderr[-4000:]}"
    _, meta = read_safetensors_header(work / "output" / "demo-lora.safetensors")
    assert meta["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"


def test_the_test_setup_installs_debians_chromium_for_the_browser_tests_and_never_downloads_one(monkeypatch, capsys):
    """`bootstrap.py test` on a Debian machine without a chromium (CI, as root): apt-get installs the distribution's
    package before pytest starts; where apt cannot run, it says the browser tests will be skipped and goes on."""
    bootstrap = import_bootstrap()
    ran = []
    monkeypatch.setattr(bootstrap, "ensure_environment", lambda extra: Path("/venv/bin/python"))
    monkeypatch.setattr(bootstrap, "find_chromium", lambda: None)
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 0, raising=False)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "apt-get" else None)
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda cmd, **kw: ran.append([str(c) for c in cmd]) or subprocess.CompletedProcess(cmd, 0))
    assert bootstrap.main(["test", "-k", "studio"]) == 0
    assert ran == [["/usr/bin/apt-get", "update"], ["/usr/bin/apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                   ["/venv/bin/python", "-m", "pytest", "-q", *bootstrap.test_workers([]), "-k", "studio"]]

    ran.clear()
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)  # no apt-get (macOS, Windows, another Linux)
    assert bootstrap.main(["test"]) == 0
    assert ran == [["/venv/bin/python", "-m", "pytest", "-q", *bootstrap.test_workers([])]]
    assert "the studio's browser tests will be skipped" in capsys.readouterr().out


def test_a_chromium_named_in_musubi_chromium_is_the_one_driven(tmp_path, monkeypatch):
    bootstrap = import_bootstrap()
    browser = tmp_path / "my-chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    monkeypatch.setenv("MUSUBI_CHROMIUM", str(browser))
    assert bootstrap.find_chromium() == str(browser)
