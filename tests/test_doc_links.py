"""Every relative link of the project's Markdown resolves to a file or folder of the checkout."""

import re

from helpers import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_resolves():
    pages = [REPO / "README.md", REPO / "BENCHMARKS.md", *REPO.glob("docs/**/*.md"), *REPO.glob("scripts/*.md")]
    assert len(pages) > 8
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = target.split("#", 1)[0]
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
