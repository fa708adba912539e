"""The documentation site builds in strict mode, with every page of its nav, and each course
chapter's page shows every figure its notebook makes.

`mkdocs build --strict` (mkdocs.yml) executes every chapter, docs/course/NN_name.py, and fails on
a cell that raises, a broken link or anchor, a page missing from the nav or the docs, and any
plugin's warning. The figure convention for chapter authors: each figure is shown by exactly one
`plt.show()` call at the top level of a code cell. mkdocs-jupyter embeds each matplotlib figure
as `<img ... src="data:image/png;base64,...">` (its stylesheet has PNG data too, in `url(...)`,
never in an `<img>`), so a chapter's page holds as many such images as its source has calls: a
figure left for the kernel to show at the end of a cell, or shown in a loop, breaks the count.
The build takes as long as the notebooks run, plus a few seconds.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
from mkdocs.utils.yaml import yaml_load

from conftest import ROOT

CONFIG = yaml_load((ROOT / "mkdocs.yml").read_text())
SHOW = re.compile(r"^plt\.show\(\)\s*(#.*)?$", re.MULTILINE)  # a call at a cell's top level
FIGURE = re.compile(r"<img\b[^>]*\bsrc=\"data:image/png;base64,")


def nav_pages(nav) -> list[str]:
    """Every page path (relative to docs/) named in the nav, in order."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


PAGES = nav_pages(CONFIG["nav"])
CHAPTERS = [page for page in PAGES if page.startswith("course/") and page.endswith(".py")]


def built(site: Path, page: str) -> Path:
    """The HTML file mkdocs writes for a page (directory URLs: guide/cli.md -> guide/cli/)."""
    path = Path(page).with_suffix("")
    return site / (path.parent if path.name == "index" else path) / "index.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", SLIMLLM_DOCS_CACHE="false")
    # The chapters run as in a user's build: without the two XLA devices conftest.py makes for
    # the tests (a chapter that needs devices sets XLA_FLAGS itself), and, as every test does,
    # without writing compiled programs into the user's cache (SLIMLLM_COMPILE_CACHE=off).
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=2", "")
    env["XLA_FLAGS"] = flags.strip()
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    return site


def test_the_nav_lists_eight_chapters():
    assert [Path(page).name[:3] for page in CHAPTERS] == [f"{n:02d}_" for n in range(1, 9)]


@pytest.mark.slow
def test_every_page_of_the_nav_is_built(site):
    missing = [page for page in PAGES if not built(site, page).is_file()]
    assert not missing, missing


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_chapter_shows_each_figure_its_notebook_makes(site, chapter):
    notebook = jupytext.read(ROOT / "docs" / chapter)
    shows = sum(
        len(SHOW.findall(cell.source)) for cell in notebook.cells if cell.cell_type == "code"
    )
    figures = len(FIGURE.findall(built(site, chapter).read_text()))
    assert figures == shows, f"{chapter}: {shows} plt.show() calls, {figures} figures on its page"
