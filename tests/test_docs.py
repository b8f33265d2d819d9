"""Run the code examples of the user documentation.

Every ```python block of each page in docs/ is executed, in order, in one namespace per
page, against the installed package. A page whose examples raise, or whose assertions
fail, fails its test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# A fenced block opened by ```python alone on its line (any indentation) and closed by ```.
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block of a Markdown text, in order."""
    blocks = []
    for m in _BLOCK.finditer(text):
        indent = len(m.group("indent"))
        lines = [line[indent:] for line in m.group("body").splitlines()]
        first_line = text.count("\n", 0, m.start("body")) + 1
        blocks.append((first_line, "\n".join(lines) + "\n"))
    return blocks


def _pages() -> list:
    if not DOCS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no docs directory at {DOCS} (e.g. tests run from an installed sdist without docs)"))]
    return [pytest.param(page, id=page.name) for page in sorted(DOCS.glob("*.md"))]


def test_block_parser():
    text = "intro\n```python\nx = 1\n```\n\n```text\nnot code\n```\n  ```python\n  y = 2\n  ```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]


@pytest.mark.parametrize("page", _pages())
def test_page_examples_run(page):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page.name} has no python examples")
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for first_line, code in blocks:
        # Compile with the page's line numbers so a traceback points into the Markdown file.
        source = "\n" * (first_line - 1) + code
        exec(compile(source, str(page), "exec"), namespace)
