"""Every relative link of the README and docs/ points at a file of the repository and, with an
#anchor, at a heading of that file (GitHub's slugs), so the manual has no dead links."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slugs(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or not re.search(r"[.#/]", target):
            continue  # http(s), mailto; or math such as [conv, ReLU](h)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            dead.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            dead.append(target)
    assert not dead, f"{page.name}: dead links {dead}"


def test_the_readmes_documentation_index_lists_every_page():
    """The README's "Documentation" section is the index of docs/: a page moved out of the
    README (the scripts' references, exit codes, clusters, weights) is found from there."""
    index = (REPO / "README.md").read_text().split("\n## Documentation\n", 1)[1].split("\n## ")[0]
    linked = {target.partition("#")[0] for target in LINK.findall(index)}
    pages = {f"docs/{page.name}" for page in PAGES[1:]}
    assert len(pages) >= 14, pages  # (docs/ was read)
    assert not pages - linked, sorted(pages - linked)
