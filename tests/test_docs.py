"""The README is a front page and the docs stay true to the repository they describe.

* README.md: at most 300 lines, the two set-up commands, the headline command, how to use .venv
  directly; no commit hashes and no dates (dated figures live in the reports).
* Every relative link of README.md and docs/*.md reaches a file, and its #anchor a heading there.
* Every repository path a page names in backticks exists (files move: the page must follow).
* Every figure (a decimal number) quoted next to a report under benchmarks/results/ is a figure of
  that report: a section's paragraphs and tables after the one naming a report quote that report.
"""

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(
    r"`((?:app|model|backends|ipu_options|experiments|benchmarks|tests|docs)"
    r"/[\w./-]*[\w/])`"
)
REPORT = re.compile(r"benchmarks/results/([\w.-]+\.md)")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)")
HASH = r"(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"  # hex with a letter and a digit
COMMIT = re.compile(rf"\b(?:commit|at) {HASH}")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def prose(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    return {slug(line) for line in prose(page.read_text(encoding="utf-8")) if line.startswith("#")}


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    needs = ("make train", "make test", "make train MODEL=b2 G=16 REPLICAS=4", ".venv/bin/python -m app")
    for needed in needs:
        assert needed in text, f"README.md must show `{needed}`"
    assert not DATE.search(text), "dated figures belong in benchmarks/results/ reports, not the README"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_no_commit_hashes_in_prose(page):
    found = COMMIT.findall("\n".join(prose(page.read_text(encoding="utf-8"))))
    assert not found, f"{name(page)} names commits {found}: no histories in user documentation"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_links_reach_files_and_headings(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.exists():
            broken.append(target)
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal):
            broken.append(target)
    assert not broken, f"{name(page)}: links to nothing: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_named_paths_exist(page):
    missing = [p for p in CODE_PATH.findall(page.read_text(encoding="utf-8")) if not (ROOT / p).exists()]
    assert not missing, f"{name(page)} names paths that do not exist: {missing}"


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for target in LINK.findall(index)}
    unlisted = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.name not in linked]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


def quoted_figures(page: Path) -> Iterator[Tuple[str, List[str]]]:
    """(figure, the reports it is quoted from): blocks (paragraphs, tables) in the order of the
    page; a block without a report name quotes the report last named in the same section."""
    reports: List[str] = []
    block: List[str] = []

    def flush() -> Iterator[Tuple[str, List[str]]]:
        nonlocal reports
        text = "\n".join(block)
        named = REPORT.findall(text)
        if named:
            reports = named
        for figure in DECIMAL.findall(re.sub(r"`[^`]*`", "", text)):
            if reports:
                yield figure, reports

    for line in prose(page.read_text(encoding="utf-8")):
        if line.startswith("#"):
            yield from flush()
            block, reports = [], []
        elif not line.strip():
            yield from flush()
            block = []
        else:
            block.append(line)
    yield from flush()


def in_report(figure: str, report: str) -> bool:
    text = (ROOT / "benchmarks" / "results" / report).read_text(encoding="utf-8")
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", text) is not None


def test_quoted_figures_are_those_of_their_reports():
    checked: Dict[str, int] = {}
    wrong = []
    for page in PAGES:
        for figure, reports in quoted_figures(page):
            existing = [r for r in reports if (ROOT / "benchmarks" / "results" / r).is_file()]
            assert existing, f"{name(page)} quotes {reports}, which do not exist"
            if not any(in_report(figure, r) for r in existing):
                wrong.append(f"{name(page)}: {figure} is not in {', '.join(existing)}")
            for r in existing:
                checked[r] = checked.get(r, 0) + 1
    assert not wrong, "\n".join(wrong)
    # The pages do quote the reports: the benchmark, input-pipeline, recipe and study figures.
    assert {
        "cpu-goals-cpu.md",
        "quick-cpu.md",
        "data-cpu.md",
        "paper-digits-cpu.md",
        "study-norms-digits-cpu.md",
    } <= set(checked)


def test_a_misquoted_figure_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "## Measured\n\nFrom `benchmarks/results/paper-digits-cpu.md`: 99.44 % native.\n\n"
        "Half reaches 97.78 %, then 12.34 % elsewhere.\n\n## Other\n\nB0 at 1.5 px.\n"
    )
    figures = list(quoted_figures(page))
    assert [f for f, _ in figures] == ["99.44", "97.78", "12.34"]  # the last section names no report
    assert [in_report(f, "paper-digits-cpu.md") for f, _ in figures] == [True, True, False]
