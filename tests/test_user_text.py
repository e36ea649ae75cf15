"""User-facing text states what the product does now: no development history.

README, docs, the package, examples, benchmarks and tests are scanned for the marks of
development history ("session 4", "issue 9", "the old estimator", "the 0.1 estimator").
History belongs in commit messages and, for released versions, in docs/changelog.md.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "docs", "stochmi", "examples", "benchmarks", "tests", ".ci"]
SUFFIXES = {".md", ".rst", ".py", ".toml", ".txt", ".ipynb", ""}
SKIP_DIRS = {"_build", "out", "__pycache__", ".ipynb_checkpoints"}
HISTORY = re.compile(
    r"\bsessions? \d|\bissues? #?\d|\b0\.\d estimator|\bold estimator|\bnew estimator",
    re.IGNORECASE,
)


def _files():
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in SUFFIXES and not SKIP_DIRS & set(f.parts):
                yield f


def _hits(lines, name):
    found = [(i, line) for i, line in enumerate(lines, 1) if HISTORY.search(line)]
    return [f"{name}:{i}: {line.strip()}" for i, line in found]


def test_the_pattern_finds_history_and_spares_present_tense():
    sample = [
        "until session 4 the rows of h2 were flagged",
        "fixed in issue #12",
        "The 0.1 estimator put I(X;h3) near 4",
        "overstated by the old estimator",
        "each session-scoped fixture trains once",
        "a noise of 0.1 and 4 sessions of Ray",
    ]
    assert [h.split(":")[1] for h in _hits(sample, "s")] == ["1", "2", "3", "4"]


def test_no_development_history_in_user_facing_text():
    files = [f for f in _files() if f.resolve() != Path(__file__).resolve()]
    assert len(files) > 100 and any(f.name == "README.md" for f in files)
    hits = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        hits += _hits(text.splitlines(), str(f.relative_to(ROOT)))
    assert not hits, "development history in user-facing text:\n" + "\n".join(hits)


README_COMMANDS = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 '
    "torchvision==0.29.1 -e . && stochmi demo",
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 '
    'torchvision==0.29.1 -e ".[test,ray]" && python -m pytest',
]


def _first_code_block(lines):
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[start], lines[start + 1 : end]


def test_readme_is_a_front_page_that_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; detail belongs in docs/"
    fence, body = _first_code_block(lines)
    assert fence == "```bash"
    assert body == README_COMMANDS
    # nothing but the title comes before the commands
    assert [line for line in lines[: lines.index(fence)] if line.strip()] == ["# stochmi"]
