"""The docs hold together: every relative link and image in README.md and docs/**/*.md points at a file
of this repository that exists, and an `#anchor` into a Markdown file names one of its headings, slugged
the way GitHub slugs them. External links (http, https, mailto, any `scheme:`) are not fetched.
README stays a five-minute read."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 220

# `[text](target)` and `![alt](target)`, with an optional "title"; the text may hold one level of
# brackets (an image inside a link). Reference-style links are not used in these docs.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        yield number, line


def github_slug(heading: str) -> str:
    """A heading's anchor as GitHub computes it (github-slugger): the rendered text, lower-cased,
    every character other than a letter, digit, `_`, `-` or space dropped, spaces turned into `-`."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """`file:line: target (why)` for each relative link or image of `path` that does not resolve."""
    problems = []
    root = root.resolve()
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):  # `[x](y)` in code is not a link
            target = match.group(1)
            if SCHEME.match(target):
                continue  # external: http(s), mailto, ...
            where, _, anchor = target.partition("#")
            where = unquote(where)
            if not where:
                resolved = path.resolve()
            elif where.startswith("/"):
                resolved = (root / where.lstrip("/")).resolve()  # GitHub: relative to the repository root
            else:
                resolved = (path.parent / where).resolve()
            label = f"{path.relative_to(root)}:{number}: {target}"
            if resolved != root and root not in resolved.parents:
                problems.append(f"{label} (outside the repository)")
            elif not resolved.exists():
                problems.append(f"{label} (no such file)")
            elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
                problems.append(f"{label} (no heading with this anchor)")
    return problems


def test_readme_is_a_five_minute_read():
    num_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert num_lines <= README_MAX_LINES, f"README.md has {num_lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path, ROOT) == []


def test_the_docs_have_a_map_that_the_readme_links():
    assert (ROOT / "docs" / "README.md").is_file()
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_github_slugs():
    assert github_slug("`shadow report`: the run as a PNG") == "shadow-report-the-run-as-a-png"
    assert github_slug("Ray Jobs and token authentication") == "ray-jobs-and-token-authentication"
    assert github_slug("FP8 vs. BF16 (tiny job, 2-core CPU)") == "fp8-vs-bf16-tiny-job-2-core-cpu"
    assert github_slug("observe_only and [strict](strict.yaml)") == "observe_only-and-strict"


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "img.png").write_bytes(b"")
    page = "# Page\n\n## The same\n\n## The same\n\n## `shadow run`: the loop\n"
    (tmp_path / "docs" / "page.md").write_text(page, encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "# Top\n"
        "[ok](docs/page.md) ![ok](docs/img.png) [ok](docs/page.md#the-same-1) [ok](#top) [ok](docs/)\n"
        "[ok](docs/page.md#shadow-run-the-loop)\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](docs/missing.md)\n"
        "![gone](docs/missing.png)\n"
        "[bad anchor](docs/page.md#the-same-2) [bad anchor](#nowhere)\n"
        "[outside](../elsewhere.md)\n",
        encoding="utf-8",
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md:8: docs/missing.md (no such file)",
        "README.md:9: docs/missing.png (no such file)",
        "README.md:10: docs/page.md#the-same-2 (no heading with this anchor)",
        "README.md:10: #nowhere (no heading with this anchor)",
        "README.md:11: ../elsewhere.md (outside the repository)",
    ]
