"""The README stays short, and the links of the README and docs/ lead somewhere.

Pure text, no imports of peftkit: milliseconds. Reference material lives in docs/, one concern a
page; the README is the front page (what peftkit is, the set-up commands, one run, the strategies,
a tour of the commands, the documentation's pages).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but hyphens and spaces dropped, spaces to
    hyphens (`Fully sharded: \\`--fsdp\\` (FSDP2)` -> `fully-sharded---fsdp-fsdp2`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The link targets of a page's prose (inline code such as `[--flag](x)` is not a link)."""
    targets = []
    for line in prose(path.read_text(encoding="utf-8")):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)  # http:, https:, mailto:, ...


def test_the_readme_is_at_most_300_lines() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move reference material to docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for target in links(page):
        if not relative(target):
            continue
        file_part, _, fragment = target.partition("#")
        destination = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file {destination.relative_to(ROOT)}")
        elif fragment and destination.suffix == ".md" and unquote(fragment).lower() not in anchors(destination):
            broken.append(f"{target}: no heading of {destination.relative_to(ROOT)} has the anchor #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if relative(t)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in readme]
    assert not unlinked, f"docs pages the README's Documentation section does not link: {unlinked}"


def test_the_anchor_rule() -> None:
    assert anchor("Fully sharded: `--fsdp` (FSDP2)") == "fully-sharded---fsdp-fsdp2"
    assert anchor("Against a Transformers `Trainer` + peft script, on CPU") == (
        "against-a-transformers-trainer--peft-script-on-cpu"
    )
    assert anchor("Reproducible installs: the lock") == "reproducible-installs-the-lock"
    assert anchor("Bug reports: `peftkit env`") == "bug-reports-peftkit-env"
