"""``samtune report`` opened in headless Chromium from disk (no server, network blocked): every
embedded image decodes and paints, and the page is not blank. Skipped where no Chromium is
installed (``.ci/setup`` installs Debian's ``chromium`` when it runs as root with apt-get)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from samtune.finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PNG_PREFIX = "data:image/png;base64,"
BAR_BLUE = (31, 111, 178)  # report/figures.py AFTER, the "after fine-tuning" bars
# after the load event, every image's decoded size into the DOM (added to a copy: the report has no script)
PROBE = ('<script>window.addEventListener("load", () => { for (const img of document.images) img.setAttribute("data-loaded", '
         'img.complete && img.naturalWidth > 0 ? img.naturalWidth + "x" + img.naturalHeight : "no"); '
         'document.body.setAttribute("data-probe", "done"); });</script>')  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        pytest.skip(f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)}); install Debian's `chromium` package (.ci/setup does when run as root)")
    return found


def run_browser(browser: str, profile: Path, *args: str) -> str:
    """Headless Chromium with a throwaway profile and every host name unresolvable (nothing can be fetched)."""
    command = [browser, "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report(both_task_run, tmp_path_factory) -> Path:
    """The report of a 2-step task-both run with one corrective round (every chart and both montages)."""
    out = tmp_path_factory.mktemp("browser") / "report.html"
    assert main(["-q", "report", str(both_task_run[1]), "--out", str(out), "--cases", "2", "--device", "cpu"]) == 0
    return out


def test_every_image_loads_in_chromium(browser, report, tmp_path):
    text = report.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 6 and all(s.startswith(PNG_PREFIX) for s in sources)
    sizes = ["{}x{}".format(*Image.open(io.BytesIO(base64.b64decode(s[len(PNG_PREFIX) :]))).size) for s in sources]
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = run_browser(browser, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert 'data-probe="done"' in dom, "the load event never fired"
    assert re.findall(r'data-loaded="([^"]+)"', dom) == sizes  # each image decoded at its PNG's own size
    plain = run_browser(browser, tmp_path / "profile", "--dump-dom", report.as_uri())  # the report itself, as Chromium parsed it
    assert plain.count('<img src="data:image/png;base64,') == 6 and "<h3>Guardrails</h3>" in plain


def test_screenshot_is_not_blank(browser, report, tmp_path):
    shot = tmp_path / "shot.png"
    run_browser(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (3000, 1200, 3)
    colours = np.unique(pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))  # one int per RGB colour
    assert colours.size > 500  # text, tables, charts: not a blank or flat page
    assert (pixels.min(axis=2) < 230).mean() > 0.03  # a fair share of the page is drawn on
    # the bar chart was painted: its "after" bars' exact blue, over a figure-sized stretch of rows
    blue = np.all(np.abs(pixels.astype(int) - BAR_BLUE) <= 2, axis=2)
    rows = np.flatnonzero(blue.any(axis=1))
    assert blue.sum() > 300 and rows.size and rows[-1] - rows[0] > 200, (blue.sum(), rows[:3], rows[-3:])
