"""The docs: the site builds with ``mkdocs build --strict``, its generated pages are current, README stays
short, and every example that runs on one CPU machine runs as written and creates what it promises.

Every ``bash`` block in README.md and docs/ carries a marker comment on the line before it,
``<!-- example: KIND [creates=PATH,PATH] (why) -->``. ``cpu`` blocks are run here, as written, in the
order of README then the site's navigation, each with ``bash -euo pipefail`` in one sandbox: a copy of
the checkout's tracked files, its own ``FLWR_HOME``, local SuperLink ports and cache (``tests/e2e_utils``).
The other kinds say what the example needs that one CPU machine does not give it (see docs/index.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e2e_utils import E2EEnv, e2e, e2e_cache  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"cpu", "install", "tests", "services", "multi-host", "docker", "gpu"}
BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- example: ([\w-]+)(?: creates=(\S+))?[^>]*-->\n$")
EXAMPLE_TIMEOUT_S = 1500


def pages() -> list[Path]:
    """README, then the site's pages in navigation order."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md"] + [ROOT / "docs" / next(iter(entry.values())) for entry in nav]


def examples() -> list[tuple[Path, str, list[str], str]]:
    """(page, kind, paths it creates, the block's text) of every command block, in reading order."""
    found = []
    for page in pages():
        text = page.read_text()
        for block in BLOCK.finditer(text):
            before = text[: block.start()]
            line = before[before.rstrip("\n").rfind("\n") + 1:]
            marker = MARKER.search(line)
            kind = marker.group(1) if marker else ""
            creates = marker.group(2).split(",") if marker and marker.group(2) else []
            found.append((page, kind, creates, block.group(1)))
    return found


def test_every_page_is_in_the_navigation_and_every_block_is_marked():
    listed = {p.name for p in pages()[1:]}
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert on_disk == listed, f"pages outside mkdocs.yml's nav: {on_disk - listed}; missing: {listed - on_disk}"
    unmarked = [f"{page.name}: {text.splitlines()[0]}" for page, kind, _, text in examples() if kind not in KINDS]
    assert not unmarked, f"command blocks without an <!-- example: {sorted(KINDS)} --> marker: {unmarked}"
    assert any(kind == "cpu" for _, kind, _, _ in examples())


def test_readme_is_short_and_points_at_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python -m pytest -q" in readme and "feda2v run" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_generated_pages_are_current():
    for tool in ("code_map.py", "bench_pages.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--check"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_mkdocs_build_strict(tmp_path: Path):
    """A broken link, a missing anchor or a page outside the nav fails the build."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


def _sandbox(dest: Path) -> Path:
    """The checkout's tracked files (what a user's clone holds), without outputs or caches."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_cpu_examples_run_as_written(e2e: E2EEnv) -> None:  # noqa: F811
    e2e.cwd = _sandbox(e2e.root / "checkout")
    ran = []
    for page, kind, creates, text in examples():
        if kind != "cpu":
            continue
        name = f"{page.stem}-{len(ran) + 1}"
        result = e2e.run(name, ["bash", "-euo", "pipefail", "-c", text], timeout=EXAMPLE_TIMEOUT_S)
        assert result.returncode == 0, f"the example of {page.name} failed:\n{text}\n{result.describe()}"
        missing = [p for p in creates if not (e2e.cwd / p).exists()]
        assert not missing, f"the example of {page.name} did not create {missing}:\n{text}\n{result.describe()}"
        ran.append(name)
    assert ran
