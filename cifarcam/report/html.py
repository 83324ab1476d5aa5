"""report.html: the report as one self-contained page, plus a heatmap gallery with filters.

The page must open from disk on a machine without network: figures and gallery maps are PNGs
inlined as data URIs, the style and the filter script are inline, and a Content-Security-Policy
forbids anything else, so a stray external reference fails visibly instead of silently. Every
text from the run (titles, class names, layer names) goes through html.escape.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cifarcam.report import queries as q
from cifarcam.report.figures import overlay_pngs
from cifarcam.results import write_text_atomic

if TYPE_CHECKING:
    from cifarcam.report.run_folder import ReportRun, Section

# Gallery size: per model x layer x method, up to this many correct and as many mistaken images
# (the same images at every layer and method of a model, so they compare side by side). It bounds
# the page: each map is a ~3 KB PNG.
GALLERY_PER_OUTCOME = 12
GALLERY_PIXELS = 96
FILTERS = ("model", "layer", "method", "class", "outcome")  # data-* attributes of a card, and the selects' names

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f3f3f3; }
figure { margin: 0.5em 0; }
img.figure { max-width: 100%; }
#filters label { margin-right: 1em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.5em; }
.card { margin: 0; width: 9em; font-size: 0.7em; text-align: center; }
.card[hidden] { display: none; }
.card img { width: 96px; height: 96px; }
.card.mistaken figcaption { color: #b00; }
"""
# Show the cards whose data-* attributes match every chosen filter ("" = any), and count them.
SCRIPT = """
const selects = Array.from(document.querySelectorAll('#filters select'));
const cards = Array.from(document.querySelectorAll('.card'));
const count = document.getElementById('count');
const model = selects.find(s => s.name === 'model');
const layer = selects.find(s => s.name === 'layer');
// Layer names are the model's own: with a model chosen, its layers alone are offered.
function offerLayers() {
  for (const option of layer.options) {
    option.hidden = option.value !== '' && model.value !== '' && !option.dataset.models.split(' ').includes(model.value);
  }
  if (layer.selectedOptions[0].hidden) layer.value = '';
}
model.addEventListener('change', offerLayers);
function applyFilters() {
  let shown = 0;
  for (const card of cards) {
    const match = selects.every(s => s.value === '' || card.dataset[s.name] === s.value);
    card.hidden = !match;
    if (match) shown += 1;
  }
  count.textContent = shown + ' of ' + cards.length + ' maps shown';
}
selects.forEach(s => s.addEventListener('change', applyFilters));
applyFilters();
"""


@dataclass(frozen=True)
class Card:
    """One gallery map: what it explains and its overlay PNG."""

    model: str
    layer: str
    method: str
    image_index: int
    true_class: str
    predicted_class: str
    correct: bool
    png: bytes = b""

    @property
    def outcome(self) -> str:
        return "correct" if self.correct else "mistaken"


def gallery_cards(report: ReportRun, per_outcome: int = GALLERY_PER_OUTCOME) -> list[Card]:
    """Maps of a bounded, deterministic sample of each model's images (report_queries.spread_picks)
    at every layer (earliest first) and method; the cam grids' image and heatmap look-ups."""
    if not report.has_cams:
        return []
    con, names = report.con, report.names
    target = q.explained_target(con)
    cards, pairs = [], []
    for model in q.cam_models(con):
        picks = q.spread_picks(con, model, target, per_outcome)
        images = report.images(picks.image_index)
        maps = {method: q.heatmaps(con, model, method, target, picks.image_index) for method in q.cam_methods(con, model)}
        for layer in q.cam_layers(con, model).layer:
            for method, by_image in maps.items():
                for p in picks.itertuples(index=False):
                    heatmap = by_image.get((p.image_index, layer))
                    if heatmap is not None:
                        cards.append(Card(model, layer, method, int(p.image_index), names[p.label], names[p.pred], bool(p.correct)))
                        pairs.append((images[p.image_index], heatmap))
    # Drawn in one go: overlay_pngs reuses one matplotlib figure for all of them.
    return [replace(card, png=png) for card, png in zip(cards, overlay_pngs(pairs, GALLERY_PIXELS))]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(frame: pd.DataFrame) -> str:
    # The same 4 significant digits as report.md; to_html escapes the cells.
    return frame.to_html(index=False, escape=True, na_rep="", border=0, float_format=lambda v: f"{v:.4g}")


def _section(n: int, section: Section, folder: Path) -> str:
    parts = [f'<section id="section-{n}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        parts.append(f"<p>{html.escape(section.text)}</p>")
    if section.table is not None and len(section.table):
        parts.append(f'<div class="wide">{_table(section.table)}</div>')
    for name in section.figures:
        uri = data_uri((folder / name).read_bytes())
        parts.append(f'<figure><img class="figure" src="{uri}" alt="{html.escape(name)}"></figure>')
    return "\n".join(parts + ["</section>"])


def _select(name: str, values: Sequence[str], models_of: dict[str, list[str]] | None = None) -> str:
    """A filter; ``models_of`` (for layers) tags each option with the models that have it."""
    tags = {v: f' data-models="{html.escape(" ".join(models_of[v]))}"' if models_of else "" for v in values}
    options = "".join(f'<option value="{html.escape(v)}"{tags[v]}>{html.escape(v)}</option>' for v in values)
    return f'<label>{name} <select name="{name}"><option value="">all</option>{options}</select></label>'


def _gallery(cards: Sequence[Card], class_order: Sequence[str]) -> str:
    if not cards:
        return '<section id="gallery"><h2>Heatmap gallery</h2><p>No cams in this run: run jobs.cam.</p></section>'
    values = {
        "model": list(dict.fromkeys(c.model for c in cards)),
        "layer": list(dict.fromkeys(c.layer for c in cards)),
        "method": list(dict.fromkeys(c.method for c in cards)),
        "class": [name for name in class_order if name in {c.true_class for c in cards}],
        "outcome": [o for o in ("correct", "mistaken") if o in {c.outcome for c in cards}],
    }
    models_of = {layer: list(dict.fromkeys(c.model for c in cards if c.layer == layer)) for layer in values["layer"]}
    items = []
    for c in cards:
        attrs = {"model": c.model, "layer": c.layer, "method": c.method, "class": c.true_class, "outcome": c.outcome, "image": str(c.image_index)}
        data = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in attrs.items())
        caption = f"{html.escape(c.model)} · {html.escape(c.layer)} · {html.escape(c.method)}<br>{html.escape(c.true_class)} → {html.escape(c.predicted_class)} ({c.outcome})"
        alt = html.escape(f"{c.method} map of test image {c.image_index} at {c.layer}")
        items.append(f'<figure class="card {c.outcome}" {data}><img src="{data_uri(c.png)}" alt="{alt}"><figcaption>{caption}</figcaption></figure>')
    return "\n".join(
        [
            '<section id="gallery"><h2>Heatmap gallery</h2>',
            f"<p>Each model's maps of the same {GALLERY_PER_OUTCOME} correctly classified and {GALLERY_PER_OUTCOME} misclassified test images"
            " (at most; taken in turn from each true class), at every CAM layer and method. Caption: model · layer · method, then true"
            " class → predicted class.</p>",
            '<form id="filters">' + "".join(_select(name, values[name], models_of if name == "layer" else None) for name in FILTERS) + "</form>",
            f'<p id="count">{len(cards)} of {len(cards)} maps shown</p>',
            '<div class="cards">',
            *items,
            "</div></section>",
        ]
    )


def render(report: ReportRun, sections: Sequence[Section], cards: Sequence[Card]) -> str:
    """The whole page: header, contents, every section, the gallery, the filter script."""
    title = html.escape(report.title)
    toc = [f'<li><a href="#section-{n}">{html.escape(s.title)}</a></li>' for n, s in enumerate(sections, 1)] + [
        '<li><a href="#gallery">Heatmap gallery</a></li>'
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            f"<title>{title}</title><style>{STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            f"<p>Run folder <code>{html.escape(str(report.run_dir))}</code>, dataset <code>{html.escape(report.cfg.data.source)}</code>.</p>",
            "<nav><ul>" + "".join(toc) + "</ul></nav>",
            *(_section(n, s, report.out) for n, s in enumerate(sections, 1)),
            _gallery(cards, report.names),
            f"<script>{SCRIPT}</script>",
            "</body></html>",
            "",
        ]
    )


def write_html(report: ReportRun, sections: Sequence[Section]) -> Path:
    """Write ``report.html`` beside report.md, from the same sections (their PNGs must exist)."""
    path = report.out / "report.html"
    write_text_atomic(path, render(report, sections, gallery_cards(report)))
    return path
