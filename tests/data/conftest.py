import pytest


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """tmp_path as the current folder, with images/ and videos/ in it: where the dataset-config tests write configs."""
    monkeypatch.chdir(tmp_path)
    for name in ("images", "videos"):
        (tmp_path / name).mkdir()
    return tmp_path
