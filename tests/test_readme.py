"""The README as documentation that runs: every ```python block executes as printed, and ``.ci/run``
runs the README's quick-start commands.

A block whose first line is a ``# needs: ...`` comment (DA-CLIP weights, trained weights) is
skipped, and says so where the reader sees it; the test keeps that set small.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NEEDS = "# needs:"
# Blocks allowed to need what CI does not have (weights that cannot be downloaded here).
MAX_SKIPPED = 1


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


PYTHON = blocks("python")


def test_readme_has_python_blocks_and_few_skipped():
    assert len(PYTHON) >= 2
    skipped = [b for b in PYTHON if b.startswith(NEEDS)]
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_readme_python_block_runs_as_printed(index, tmp_path):
    code = PYTHON[index]
    if code.startswith(NEEDS):
        pytest.skip(code.splitlines()[0])
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr}"


def test_readme_restore_block_prints_a_clamped_result(tmp_path):
    code = next(b for b in PYTHON if "from_pretrained(\"demo\")" in b)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    low, high = map(float, re.search(r"range (-?[\d.]+)\.\.(-?[\d.]+)", proc.stdout).groups())
    assert 0.0 <= low <= high <= 1.0
    assert "(2, 3, 120, 160)" in proc.stdout


def _commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quick_start_commands():
    """Both quick-start blocks (install + restore, test extras + tests), line for line, in .ci/run;
    only the virtual environment's name differs."""
    quick_start = README[README.index("## Quick start"):]
    bash = re.findall(r"^```bash\n(.*?)^```$", quick_start, flags=re.S | re.M)[:2]
    install, tests = (_commands(b) for b in bash)
    assert install[-1].startswith("m2restore restore ") and tests == ['pip install -e ".[test]"',
                                                                     "python -m pytest --quick -n 2 --dist worksteal"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in install + tests:
        if "venv" in command:
            continue
        assert command in ci, f".ci/run does not run the README's `{command}`"
    assert ci.index(install[-1]) < ci.index(tests[0]) < ci.index(tests[1])
