"""report.html in a real headless browser (Debian's Chromium through Selenium): the demo run's page
renders, logs no console error, loads nothing from outside the file, decodes every figure, shows
the same sections and tables as report.md, and its gallery filters show exactly the matching maps.

Chromium and its driver are installed with apt when missing (root only); without root or apt the
tests skip, except where CIFARCAM_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import duckdb
import pytest

from cifarcam.report.html import FILTERS, GALLERY_PER_OUTCOME
from helpers import run_job

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MAX_HTML_BYTES = 15 * 1024 * 1024


def _unavailable(why: str) -> None:
    if os.environ.get("CIFARCAM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CIFARCAM_REQUIRE_BROWSER=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            _unavailable("Chromium is not installed and installing it needs root and apt-get")
        proc = subprocess.run(["bash", str(Path(__file__).parent / "install-browser.sh")], capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            _unavailable(f"apt-get could not install chromium: {proc.stderr[-2000:]}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path given: Selenium Manager downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(demo_run, browser):
    """The demo run's report.html, as the pipeline wrote it, opened from disk."""
    path = demo_run / "report" / "report.html"
    assert path.is_file(), "the pipeline wrote no report.html"
    browser.get(path.as_uri())
    return browser


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _cards(browser) -> list[dict]:
    """Every gallery card's data-* attributes and whether it takes up space on the page."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.card')).map(c => Object.assign({visible: c.getClientRects().length > 0}, c.dataset));"
    )


def _choose(browser, **chosen: str) -> tuple[list[int], str]:
    """Set every filter (unnamed ones to 'all'); the visible cards' positions and the count text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name in FILTERS:
        Select(browser.find_element(By.CSS_SELECTOR, f'#filters select[name="{name}"]')).select_by_value(chosen.get(name, ""))
    visible = [i for i, card in enumerate(_cards(browser)) if card["visible"]]
    return visible, browser.find_element(By.ID, "count").text


def test_the_page_renders_offline_without_errors(page, demo_run, tmp_path):
    shot = tmp_path / "report.png"
    assert page.save_screenshot(str(shot))
    from PIL import Image

    width, height = _png_size(shot.read_bytes())
    assert width >= 1000 and height >= 600, (width, height)
    assert len(Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24)) > 50  # not a blank page
    severe = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    fetched = page.execute_script("return performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'));")
    assert fetched == [], fetched
    html = (demo_run / "report" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert (demo_run / "report" / "report.html").stat().st_size < MAX_HTML_BYTES


def test_the_page_has_report_mds_sections_tables_and_decoded_figures(page, demo_run):
    from selenium.webdriver.common.by import By

    md = (demo_run / "report" / "report.md").read_text()
    titles = [h.text for h in page.find_elements(By.TAG_NAME, "h2")]
    assert titles == re.findall(r"^## (.*)$", md, re.M) + ["Heatmap gallery"]
    md_tables = len(re.findall(r"^\|[:\-|]+\|$", md, re.M))  # one header rule per Markdown table
    assert md_tables and len(page.find_elements(By.CSS_SELECTOR, "section table")) == md_tables
    figures = page.execute_script("return Array.from(document.querySelectorAll('img.figure')).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert [alt for alt, *_ in figures] == linked
    for name, complete, width, height in figures:
        assert complete and (width, height) == _png_size((demo_run / "report" / name).read_bytes()), name
    first_model = duckdb.sql(f"select model from '{demo_run}/accuracy.parquet' order by test_top1 desc, model limit 1").fetchall()[0][0]
    table2 = page.find_elements(By.CSS_SELECTOR, "#section-1 table tbody tr")
    assert table2 and table2[0].find_elements(By.TAG_NAME, "td")[0].text == first_model


def test_the_gallery_shows_the_sampled_maps_of_the_parquet(page, demo_run):
    cards = _cards(page)
    cams = f"read_parquet('{demo_run}/cams/**/*.parquet', hive_partitioning = true)"
    per_model = duckdb.sql(
        f"""select model, count(distinct layer) * count(distinct method) *
                   (least(count(distinct image_index) filter (where correct), {GALLERY_PER_OUTCOME})
                    + least(count(distinct image_index) filter (where not correct), {GALLERY_PER_OUTCOME}))
            from {cams} where target = 'pred' group by model"""
    ).fetchall()
    expected = dict(per_model)
    assert {m: sum(c["model"] == m for c in cards) for m in expected} == expected
    assert len(cards) == sum(expected.values()) and all(c["visible"] for c in cards)
    rows = {
        (m, layer, k, i): (ok, label)
        for m, layer, k, i, ok, label in duckdb.sql(f"select model, layer, method, image_index, correct, label from {cams} where target = 'pred'").fetchall()
    }
    class_of_label = {}
    for c in cards:
        correct, label = rows[(c["model"], c["layer"], c["method"], int(c["image"]))]
        assert c["outcome"] == ("correct" if correct else "mistaken"), c
        assert class_of_label.setdefault(label, c["class"]) == c["class"], c  # one name per class
    assert len(set(class_of_label.values())) == len(class_of_label)
    for name, column in (("model", "model"), ("layer", "layer"), ("method", "method")):
        options = page.execute_script(f"return Array.from(document.querySelectorAll('select[name={name}] option')).map(o => o.value);")
        assert options[0] == "" and sorted(options[1:]) == sorted(v for (v,) in duckdb.sql(f"select distinct {column} from {cams}").fetchall())


def test_the_gallery_filters_change_what_is_shown(page):
    cards = _cards(page)
    total = len(cards)
    assert total > 0
    model = cards[0]["model"]
    mistaken = next(c for c in cards if c["outcome"] == "mistaken" and c["model"] == model)
    choices = [
        {"model": model},
        {"outcome": "mistaken"},
        {"outcome": "correct"},
        {"class": mistaken["class"]},
        {"layer": mistaken["layer"]},
        {"model": model, "outcome": "mistaken", "class": mistaken["class"]},
        {"model": model, "layer": mistaken["layer"], "method": mistaken["method"], "outcome": "mistaken"},
    ]
    for chosen in choices:
        visible, count = _choose(page, **chosen)
        expected = [i for i, c in enumerate(cards) if all(c[k] == v for k, v in chosen.items())]
        assert 0 < len(expected) < total, chosen  # each choice narrows the gallery
        assert visible == expected, chosen
        assert count == f"{len(expected)} of {total} maps shown", (chosen, count)
    visible, count = _choose(page)
    assert visible == list(range(total)) and count == f"{total} of {total} maps shown"


def test_the_report_job_writes_and_names_report_html(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("train", "tune", "tensorboard", "report"))
    proc = run_job("jobs.report", "--run", str(run), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = run / "report" / "report.html"
    lines = proc.stdout.splitlines()
    assert f"report: {run / 'report' / 'report.md'}" in lines and f"report: {html}" in lines
    assert html.stat().st_size > 100_000 and "maps shown" in html.read_text()


def test_choosing_a_model_offers_its_own_layers_only(page, demo_run):
    """Layer names belong to a model (layer4 is resnet's, blocks.5 mobilenet's): once a model is
    chosen, the layer select offers that model's layers, and a layer of another model is dropped."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cams = f"read_parquet('{demo_run}/cams/**/*.parquet', hive_partitioning = true)"
    layers_of = {}
    for model, layer in duckdb.sql(f"select distinct model, layer from {cams}").fetchall():
        layers_of.setdefault(model, set()).add(layer)
    assert len(layers_of) == 2 and not set.intersection(*layers_of.values())  # the demo's two families share no layer name
    (first, first_layers), (second, second_layers) = sorted(layers_of.items())

    def offered() -> set[str]:
        return set(
            page.execute_script(
                "return Array.from(document.querySelectorAll('select[name=layer] option')).filter(o => !o.hidden && o.value).map(o => o.value);"
            )
        )

    visible, _ = _choose(page)
    assert offered() == first_layers | second_layers
    visible, _ = _choose(page, model=first, layer=sorted(first_layers)[0])
    assert offered() == first_layers and visible
    Select(page.find_element(By.CSS_SELECTOR, 'select[name="model"]')).select_by_value(second)
    assert offered() == second_layers
    assert page.find_element(By.CSS_SELECTOR, 'select[name="layer"]').get_attribute("value") == ""  # the other model's layer was dropped
    cards = _cards(page)
    assert {c["model"] for c in cards if c["visible"]} == {second} and sum(c["visible"] for c in cards) == sum(c["model"] == second for c in cards)
    _choose(page)
