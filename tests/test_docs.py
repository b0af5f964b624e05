"""The README is a front door and the docs point at what exists: README.md at most 200 lines;
every relative link in README.md, docs/*.md and infra/README.md resolves (a file or folder of
this checkout, and a ``#section`` one of the target page's headings); every repository path the
pages name in backticks exists (docs/experiments/ is the dated record and is not checked)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "infra" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
CODE = re.compile(r"`([^`\n]+)`")
TOP = ("models/", "preprocessing/", "pipelines/", "training/", "expportrait/", "infra/", "configs/",
       "benchmarks/", "tests/", "docs/", "requirements/")
USER_MADE = {"infra/docker/.env"}     # files the pages tell the user to create (from .env.example)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside fenced code)."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def prose(page: Path) -> str:
    """The page without its fenced code blocks (commands there hold placeholders)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200: details go to docs/)"


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file or ``#section`` does not exist."""
    broken = []
    for match in LINK.finditer(prose(page)):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue                                        # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return broken


def missing_paths(page: Path) -> list[str]:
    """Repository paths the page names in backticks (outside code blocks) that do not exist."""
    missing = []
    for match in CODE.finditer(prose(page)):
        for token in match.group(1).split():
            token = token.strip(",;:()'\"")
            if not token.startswith(TOP) or re.search(r"[<>*{}]|\.\.\.|[A-Z]{3,}", token):
                continue                                    # a placeholder, a glob, a pattern
            path = token.split("#")[0].split("::")[0]
            if path not in USER_MADE and not (REPO / path).exists():
                missing.append(token)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert not (broken := broken_links(page)), f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_repository_paths_exist(page):
    assert not (missing := missing_paths(page)), f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_checks_catch_a_stale_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no section](#nope) [web](https://x.org)\n"
                    "`infra/slurm/train.sbatch` `infra/kuberay/preprocess-rayjob.yaml` `configs/recipes/NAME.yaml`\n"
                    "```\n[in code](skipped.md) `infra/nothing`\n```\n")
    assert broken_links(page) == ["missing.md: no such file", "#nope: no heading '#nope' in page.md"]
    assert missing_paths(page) == ["infra/kuberay/preprocess-rayjob.yaml"]
