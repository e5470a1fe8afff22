"""Every ```python block of the README, and every whole program among docs/pytorch.md's, runs as written, each on
its own in an empty folder, and prints the lists its comments say it prints.

A block that needs what a test cannot supply (a vocoder package, the zoo's data) says so in a comment
line of its own, `# needs: ...`, and is skipped here with that reason; such a block runs in the test
named beside it instead (the vocoder recipe: tests/lightning_wn/test_vocoder.py).
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS = re.compile(r"^# needs: (.+)$", re.M)


def python_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(the heading above it, its first line's number in the file, the code) of each python block."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((headings[-1] if headings else "top", first_line, match.group(1)))
    return blocks


# the docs' fragments (a method, a `with` block) continue the text around them: only whole programs run
BLOCKS = [
    pytest.param(path, first_line, code, id=f"{path.name}: {heading} (line {first_line})")
    for path in (ROOT / "README.md", ROOT / "docs" / "pytorch.md")
    for heading, first_line, code in python_blocks(path)
    if path.name == "README.md" or re.match(r"(import|from) ", code)
]


def test_the_readme_and_docs_have_python_examples():
    assert sum(param.values[0].name == "README.md" for param in BLOCKS) >= 3
    assert any(param.values[0].name == "pytorch.md" for param in BLOCKS)


@pytest.mark.parametrize("path, first_line, code", BLOCKS)
def test_a_python_block_runs_as_written_and_prints_what_its_comments_say(path, first_line, code, tmp_path, monkeypatch):
    if needs := NEEDS.search(code):
        pytest.skip(f"needs {needs.group(1)}")
    monkeypatch.chdir(tmp_path)  # whatever a block writes (Lightning's logs and checkpoints) lands here
    padded = "\n" * (first_line - 1) + code  # a traceback names the file's own line
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(padded, str(path), "exec"), {"__name__": "readme_example"})
    # `print(...)  # ...: ['0', '3']`: the first list in the comment is what the line prints
    for shown in re.findall(r"^print\(.*\)\s+#[^\[\n]*(\[[^\]\n]*\])", code, flags=re.M):
        assert shown in printed.getvalue()
