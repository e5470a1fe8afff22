"""The README's and docs/pytorch.md's Python examples run as written, and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


# whole programs; fragments (a method, a `with` block) and examples that need another package (`# needs: ...`) aside
EXAMPLES = [(path.name, block) for path in (ROOT / "README.md", ROOT / "docs/pytorch.md")
            for block in python_blocks(path) if re.match(r"(import|from) ", block)]  # fmt: skip


def test_the_examples_are_found():
    assert [name for name, _ in EXAMPLES] == ["README.md"] * 4 + ["pytorch.md"]


@pytest.mark.parametrize(("name", "block"), EXAMPLES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(EXAMPLES)])
def test_an_example_runs_as_written_and_prints_what_its_comments_say(name, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Lightning quickstart writes its logs and checkpoints there
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, name, "exec"), {"__name__": "__main__"})
    # `print(...)  # ...: ['0', '3']`: the first list in the comment is what the line prints
    for shown in re.findall(r"^print\(.*\)\s+#[^\[\n]*(\[[^\]\n]*\])", block, flags=re.M):
        assert shown in printed.getvalue()
