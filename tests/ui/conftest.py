"""The studio as a user meets it: `python -m musubi_tuner.ui` in a fresh workspace, driven by Debian's Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Screenshots of each page, kept after the run (CI keeps the folder as artifacts).
ARTIFACTS = Path(os.environ.get("MUSUBI_UI_ARTIFACTS", ROOT / "test-artifacts" / "studio"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_SECONDS = 180


def find_chromium() -> str | None:
    """Debian's chromium, as bootstrap.py test finds (and installs) it; never a downloaded build."""
    sys.path.insert(0, str(ROOT))
    try:
        from bootstrap import find_chromium as find
    finally:
        sys.path.remove(str(ROOT))
    return find()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studio(tmp_path_factory):
    """(base URL, workspace) of a studio started as a user starts it, on a free port, in a new workspace."""
    pytest.importorskip("starlette", reason="the studio's extra is not installed (pip install -e .[ui])")
    workspace = tmp_path_factory.mktemp("studio")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    log = open(workspace.parent / f"{workspace.name}-server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "musubi_tuner.ui", "--workspace", str(workspace), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_SECONDS
    while "studio at http" not in Path(log.name).read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the studio did not start:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", workspace
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium found (apt-get install chromium, or set MUSUBI_CHROMIUM); bootstrap.py test installs it")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
