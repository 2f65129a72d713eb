"""The README's runnable examples (the ```python blocks after a ``<!-- tested: ... -->`` line)
run as they are and their checks hold: a user who pastes them gets what the README says."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- tested: tests/test_readme.py -->"


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, source) of each ```python block that directly follows the marker."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = []
    for m in re.finditer(re.escape(MARK) + r"\n```python\n(.*?)\n```", text, re.S):
        blocks.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


def test_readme_marks_its_examples():
    blocks = readme_blocks()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    # every marker is followed by a python block (a marker before anything else would be a
    # silently untested example)
    assert len(blocks) == text.count(MARK) >= 2, (len(blocks), text.count(MARK))


@pytest.mark.parametrize("line,source", readme_blocks(),
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_example_runs(line, source):
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__readme__"})
