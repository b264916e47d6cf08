"""The report in a real browser: headless Chromium loads it offline, with no console errors, every
figure decoded, every table present, and a screenshot saved.

Needs Debian's `chromium` package (CI installs it and sets HARNESS_REQUIRE_BROWSER=1, which turns a
missing browser into a failure instead of a skip). HARNESS_SCREENSHOT_DIR, when set, receives a copy
of the screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import report_fixture as fx

from harness.reporting import make_report

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
TIMEOUT_S = 180

# Injected first into <head> of a copy of the report: records errors (script errors, failed resource
# loads, console.error) and, after load, what the page holds, in a <pre> that --dump-dom prints.
PROBE = """<script>
window.__probeErrors = [];
window.addEventListener('error', function (e) {
  var target = e.target && (e.target.src || e.target.href);
  window.__probeErrors.push('error: ' + (e.message || target || 'unknown'));
}, true);
var __consoleError = console.error;
console.error = function () {
  window.__probeErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  __consoleError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var result = {
    images: images.length,
    broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                  .map(function (i) { return i.alt; }),
    tables: Array.prototype.map.call(document.querySelectorAll('[data-table]'),
                                     function (t) { return t.getAttribute('data-table'); }),
    table_elements: document.querySelectorAll('table').length,
    resources: performance.getEntriesByType('resource').map(function (r) { return r.name; }),
    height: document.documentElement.scrollHeight,
    errors: window.__probeErrors
  };
  var pre = document.createElement('pre');
  pre.id = 'probe-result';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        message = "headless Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("HARNESS_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; HARNESS_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    return path


def run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=TIMEOUT_S
    )


def probe_page(browser: str, page: Path, profile: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """Load `page` with the probe injected; returns the probe's findings and the browser's output."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = run_browser(
        browser,
        profile,
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no probe result (exit {done.returncode}); stderr tail:\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1))), done


def console_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
def test_probe_catches_broken_images_and_errors(browser, tmp_path):
    """The detector itself: a page with a broken image and a script error must be caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    result, done = probe_page(browser, page, tmp_path / "profile")
    assert result["broken"] == ["broken"]
    assert any("boom" in e for e in result["errors"]) and any("undefinedFunction" in e for e in result["errors"])
    assert len(console_lines(done)) >= 2


@pytest.mark.slow
def test_report_in_headless_chromium(browser, tmp_path):
    fx.build_results(tmp_path / "results")
    html_path, report = make_report(tmp_path / "results", tmp_path / "report")
    assert "<script" not in html_path.read_text()  # the report itself runs no code
    result, done = probe_page(browser, html_path, tmp_path / "profile-dom")

    assert result["errors"] == []
    assert console_lines(done) == []  # the report has no scripts: any console output is an error
    assert result["resources"] == []  # nothing fetched: the file is self-contained
    assert result["images"] == len(report.figures) >= 3
    assert result["broken"] == []
    expected_tables = {"verdicts"} | {t.key for t in report.all_tables}
    assert expected_tables <= set(result["tables"])
    assert result["table_elements"] >= len(expected_tables)

    shot = tmp_path / "report.png"
    height = max(800, min(int(result["height"]) + 50, 16000))
    run_browser(
        browser, tmp_path / "profile-shot", f"--window-size=1400,{height}", f"--screenshot={shot}", html_path.as_uri()
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] == 1400
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # not a blank page
    target = os.environ.get("HARNESS_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "report.png")
