"""The README's and docs/' Python examples run as written (each in a fresh interpreter, in an empty folder), and
every relative link in them points at a file of the checkout. Examples that need a real checkpoint ("path/to/..."),
vLLM or a running server are not run here (tests/serving and tests/engines/vllm cover those paths)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN_HERE = ("path/to", "vllm", "VLLM", "127.0.0.1:", "localhost:")  # a checkpoint, vLLM, a running server


def python_examples() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            code = match.group(1)
            line = text[: match.start()].count("\n") + 1
            marks = (
                [pytest.mark.skip(reason="needs a real checkpoint, vLLM or a running server")]
                if any(word in code for word in NOT_RUN_HERE)
                else []
            )
            found.append(pytest.param(code, id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return found


@pytest.mark.parametrize("code", python_examples())
def test_python_example_runs_as_written(code, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"
