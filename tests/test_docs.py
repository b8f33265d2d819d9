"""Run the code examples of the user documentation, and follow the links between its pages.

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
        if "```python mpi" in page.read_text(encoding="utf-8"):
            pytest.skip(f"{page.name}'s program runs on several processes: test_distributed.py runs it")
        pytest.skip(f"{page.name} has no python examples")
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for first_line, code in blocks:
        # Compile with the page's line numbers so a traceback points into the Markdown file.
        source = "\n" * (first_line - 1) + code
        exec(compile(source, str(page), "exec"), namespace)


# Links between the pages: [text](page.md#anchor), [text](#anchor) and [text](page.md).
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_FENCED = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"(?P<id>[^\"]+)\"")


def anchors(text: str) -> set:
    """The anchors a Markdown page offers, as GitHub makes them: each heading lowercased,
    without punctuation, spaces as hyphens (-1, -2, ... after repeats), and <a id="..."> tags.
    Headings inside fenced blocks (comments of shell examples) are not headings."""
    prose = _FENCED.sub("", text)
    seen: dict = {}
    found = set(m.group("id") for m in _HTML_ANCHOR.finditer(prose))
    for m in _HEADING.finditer(prose):
        slug = re.sub(r"[^\w\- ]", "", m.group("title").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_anchor_rules():
    text = "# Goals\n## The `mtht-bench` CLI: flags\n```bash\n# not a heading\n```\n## Goals\n<a id=\"x-y\"></a>\n"
    assert anchors(text) == {"goals", "the-mtht-bench-cli-flags", "goals-1", "x-y"}


def _link_pages() -> list:
    pages = sorted(DOCS.glob("*.md")) if DOCS.is_dir() else []
    readme = DOCS.parent / "README.md"
    return [pytest.param(page, id=page.name) for page in pages + ([readme] if readme.is_file() else [])]


@pytest.mark.parametrize("page", _link_pages())
def test_links_between_pages_lead_somewhere(page):
    broken = []
    for m in _LINK.finditer(_FENCED.sub("", page.read_text(encoding="utf-8"))):
        target = m.group("target")
        if re.match(r"^[a-z]+:", target):  # https:, mailto: and the like
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{page.name} links to what does not exist: {broken}"
