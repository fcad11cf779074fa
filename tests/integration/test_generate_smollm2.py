"""The real SmolLM2 through the CLI: the default model knows the capital of France."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_model_answers_paris():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "explorer", "generate", "--prompt", "What is the capital of France?",
                          "--max-new-tokens", "24"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
