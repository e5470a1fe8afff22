"""Every ```python block of the README runs as written, each on its own, in an empty folder.

A block that needs what a test cannot supply (a vocoder package, the zoo's data) says so in a comment
line of its own, `# needs: ...`, and is skipped here with that reason; such a block runs in the test
named beside it instead (the vocoder recipe: tests/lightning_wn/test_vocoder.py).
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = re.compile(r"^# needs: (.+)$", re.M)


def python_blocks() -> list[tuple[str, int, str]]:
    """(the heading above it, its first line's number in the README, the code) of each python block."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((headings[-1] if headings else "top", first_line, match.group(1)))
    return blocks


BLOCKS = [
    pytest.param(first_line, code, id=f"{heading} (line {first_line})")
    for heading, first_line, code in python_blocks()
]


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("first_line, code", BLOCKS)
def test_the_readme_python_block_runs_as_written(first_line, code, tmp_path, monkeypatch):
    if needs := NEEDS.search(code):
        pytest.skip(f"needs {needs.group(1)}")
    monkeypatch.chdir(tmp_path)  # whatever a block writes (Lightning's logs and checkpoints) lands here
    padded = "\n" * (first_line - 1) + code  # a traceback names the README's own line
    exec(compile(padded, str(README), "exec"), {"__name__": "readme_example"})
