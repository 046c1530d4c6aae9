import os

# OpenMP threads that spin while waiting steal the cores of the command subprocesses some tests run
# (and of anything else on a small CI machine); set before torch loads OpenMP, inherited by subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run on CPU with small models; two threads is what CI machines have, shared by the test processes
# pytest-xdist runs side by side (one thread each then).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

DATA = os.path.join(os.path.dirname(__file__), "fixtures")


def pytest_collection_modifyitems(config, items):
    """The minutes-long runs (marked slow) go first, so that with several workers they overlap the many short tests
    instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def temporary_folder_of_the_session():
    """The commands' temporary folder (TMPDIR, inherited by the commands the tests start) is one of this test process's,
    removed at its end: a LoRA rescued from a full disk (training's rescue) was left in /tmp by every run of the suite.
    Anyone may enter it (mode 1777, as /tmp), for the tests that run a command as another user."""
    import multiprocessing.util
    import shutil
    import tempfile

    multiprocessing.util.get_temp_dir()  # (made now, in the usual place: removed at exit, after this folder is gone)
    folder = tempfile.mkdtemp(prefix="musubi-tests-")
    os.chmod(folder, 0o1777)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = folder, None
    yield folder
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def manifest():
    import json

    def load(name: str) -> dict:
        with open(os.path.join(DATA, "manifests", name)) as f:
            return json.load(f)

    return load


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny models, dataset and LoRAs of the reliability matrix (tests/reliability), built once per session."""
    from reliability_assets import build_assets  # tests/reliability is on sys.path while its tests run

    return build_assets(tmp_path_factory.mktemp("reliability"))
