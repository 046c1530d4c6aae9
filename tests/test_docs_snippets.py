"""Every ```python example in the README and in docs/*.md runs as printed, on the CPU, with the demo's tiny models.

Each example runs in a fresh namespace, in a working directory that holds the tiny models where the official
download puts the real ones (`ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt`,
`ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt`, `ckpts/text_encoder`, `ckpts/text_encoder_2`: what
`python -m musubi_tuner.demo` writes under `demo_output/`). An example that truly needs a GPU or real weights is
marked by an HTML comment, invisible on the rendered page, on the line right above its fence:

    <!-- example not run: needs a CUDA GPU -->

The reason after the colon is required. Examples of other languages (bash, toml, text) are not run here.
"""

import re
from pathlib import Path

import pytest

from musubi_tuner.demo.__main__ import write_models

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*example not run:\s*(.*?)\s*-->\s*$")


def examples() -> list[tuple[str, int, str, str | None]]:
    """(page, line of the fence, code, reason it is not run or None), in page order."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = NOT_RUN.search(above)
            found.append((page.relative_to(ROOT).as_posix(), line, match.group(1), marker.group(1) if marker else None))
    return found


EXAMPLES = examples()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs_examples")
    write_models(root)
    return root


def test_the_docs_have_python_examples_and_each_skipped_one_says_why():
    assert EXAMPLES, "no ```python examples found in README.md and docs/"
    for page, line, _, reason in EXAMPLES:
        assert reason is None or reason.strip(), f"{page}:{line}: an example marked not run needs a reason"


@pytest.mark.parametrize("page,line,code,reason", EXAMPLES, ids=[f"{p}:{n}" for p, n, _, _ in EXAMPLES])
def test_python_example_runs(page, line, code, reason, workspace, monkeypatch):
    if reason is not None:
        pytest.skip(f"marked not run: {reason}")
    monkeypatch.chdir(workspace)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs_example__"})
