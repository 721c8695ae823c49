"""The documentation stays usable: README.md is a short landing page, relative links in
README.md and docs/ resolve, every program the docs name as `python -m MODULE` exists, and
every program (named or not) answers `--help`."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
MAX_README_LINES = 200

# `python -m MODULE`, `python3 -m MODULE`, `.venv/bin/python -m MODULE`, in prose or code.
COMMAND = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*[\w])")
NOT_PROGRAMS = {"pytest", "pip", "venv"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# absl's --help prints the flags to stdout, ends with this line and exits with status 1.
ABSL_HELP_END = "Try --helpfull to get a list of all flags."


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO))


def named_modules() -> dict[str, list[str]]:
    """{module: [pages naming it]} for every `python -m MODULE` in the docs. Placeholders
    (a component in capitals, as in `launch.NAME`) are not programs."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for module in COMMAND.findall(page.read_text(encoding="utf-8")):
            if module.split(".")[0] in NOT_PROGRAMS or any(p.isupper() for p in module.split(".")):
                continue
            found.setdefault(module, [])
            if _rel(page) not in found[module]:
                found[module].append(_rel(page))
    return found


MODULES = named_modules()
# Every program, named in the docs or not: launch/*.py and the benchmarks.
PROGRAMS = sorted(set(MODULES) | {
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in [*(REPO / "launch").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    if p.stem not in ("__init__", "common")})


def module_file(module: str) -> pathlib.Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details to docs/")


def _prose(text: str) -> str:
    """The text without fenced or indented code blocks and inline code spans, where
    brackets are code rather than links."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation other than - and _
    dropped, spaces to hyphens."""
    out = set()
    for line in _prose(page.read_text(encoding="utf-8").replace("`", "")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_named_programs_exist():
    assert len(MODULES) >= 10, f"expected the docs to name the programs, found {sorted(MODULES)}"
    missing = [f"{m} (named in {', '.join(pages)})" for m, pages in sorted(MODULES.items())
               if module_file(m) is None]
    assert not missing, "no such module in the repository: " + "; ".join(missing)


@pytest.mark.slow
@pytest.mark.parametrize("module", PROGRAMS)
def test_every_program_answers_help(module, tmp_path):
    """From another directory: the packages are installed (`pip install -e .`), so the
    programs run from anywhere."""
    named = f"named in {', '.join(MODULES[module])}" if module in MODULES else "not in the docs"
    if module_file(module) is None:
        pytest.fail(f"{module}: no such module ({named})")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    where = f"`python -m {module} --help` ({named})"
    # argparse exits 0 after --help; absl exits 1 after printing its help.
    absl_help = run.returncode == 1 and run.stdout.rstrip().endswith(ABSL_HELP_END)
    assert run.returncode == 0 or absl_help, (
        f"{where} exited with {run.returncode}:\n{out[-3000:]}")
    assert "Traceback" not in out, f"{where} raised:\n{out[-3000:]}"
    assert re.search(r"--\w", run.stdout), f"{where} printed no flags:\n{out[-3000:]}"
