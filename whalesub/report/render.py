"""The HTML of the error report (:mod:`whalesub.report.build`): plots, thumbnails, tables.

Everything is embedded as ``data:`` URIs (matplotlib PNG plots, Pillow JPEG thumbnails), so the page
is one file that opens offline and can be mailed. Thumbnails are decoded with
:func:`whalesub.data.image.load_image` (DCT-domain downscaling for big JPEGs), only for the rows shown,
each image once. An image that cannot be read is a grey placeholder with its name, never a broken
``<img>``.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

import whalesub
from whalesub.core.errors import DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.data.image import load_image

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.plots img{margin-right:12px;border:1px solid #ddd;background:#fff}
.row{display:flex;gap:6px;align-items:flex-start;margin:8px 0;padding:6px;background:#fff;
border:1px solid #e4e4e4}
.cell{width:WIDTHpx;font-size:11px;text-align:center;border:3px solid transparent;padding:2px;
overflow-wrap:anywhere}
.cell img,.ph{width:WIDTHpx;height:WIDTHpx;object-fit:contain;background:#eee;display:block}
.ph{display:flex;align-items:center;justify-content:center;color:#666;font-size:11px}
.ok{border-color:#1a9641}.query{border-color:#2b83ba}.new .ph{background:#fde9c9}
.missed{opacity:.85;border-style:dashed;border-color:#d7191c}.meta{font-size:12px;width:170px;text-align:left}
pre{white-space:pre-wrap;background:#fff;border:1px solid #ddd;padding:8px;font-size:12px}
"""


def png_uri(fig) -> str:
    """A matplotlib figure as a ``data:image/png`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_threshold_curve(curve: list[dict], threshold: dict) -> str:
    """MAP@5 (all, known, new) against the threshold, the chosen threshold marked: PNG URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    t = [r["threshold"] for r in curve]
    for key, name, style in (("map5", "all", "-"), ("map5_known", "known", "--"), ("map5_new", "new", ":")):
        ax.plot(t, [r[key] for r in curve], style, label=name)
    if "lo" in threshold:
        ax.axvspan(max(threshold["lo"], min(t)), min(threshold["hi"], max(t)), color="grey", alpha=0.15)
    ax.axvline(threshold["value"], color="crimson", lw=1.2,
               label=f"chosen {threshold['value']:.3f}: MAP@5 {threshold.get('map5', float('nan')):.3f}")
    ax.set_xlabel("threshold (cosine score of new_individual)")
    ax.set_ylabel("MAP@5")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return png_uri(fig)


def plot_top1_hist(top1: np.ndarray, is_new, threshold: float) -> str:
    """Histograms of the best candidate's cosine, known vs new animals (all without truth): PNG URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.add_subplot()
    finite = top1[np.isfinite(top1)]
    bins = np.linspace(min(finite.min(initial=0.0), threshold) - 0.02, max(finite.max(initial=1.0),
                                                                          threshold) + 0.02, 41)
    groups = [("all queries", np.ones(top1.size, bool))] if is_new is None else [
        ("known animals", ~is_new), ("new animals", is_new)]
    for name, mask in groups:
        values = top1[mask & np.isfinite(top1)]
        ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({values.size})")
    ax.axvline(threshold, color="crimson", lw=1.2, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("top-1 cosine (best individual's score)")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8, loc="upper left")
    return png_uri(fig)


class Thumbnails:
    """JPEG ``data:`` URIs of images, each decoded once, at most ``px`` pixels on the long side."""

    def __init__(self, px: int):
        self.px, self.cache, self.failed = px, {}, []

    def uri(self, folder: Path | None, name: str) -> str | None:
        if folder is None:
            return None
        key = (folder, name)
        if key not in self.cache:
            self.cache[key] = self._make(folder / name)
        return self.cache[key]

    def _make(self, path: Path) -> str | None:
        try:
            img = Image.fromarray(load_image(path, target=self.px))
        except DataError as exc:
            self.failed.append(str(path))
            log.debug("no thumbnail: %s", exc)
            return None
        img.thumbnail((self.px, self.px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (
        f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v)))


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<div class="ph">{html.escape(alt)}</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def render_cell(c: dict, thumbs: Thumbnails, gallery_dir, threshold: float, css: str = "") -> str:
    """One candidate: thumbnail (or placeholder), label, score; outlined when correct."""
    new = c["label"] == NEW_INDIVIDUAL
    score = threshold if new else c["score"]
    image = None if new or c.get("image") is None else thumbs.uri(gallery_dir, c["image"])
    alt = "new_individual" if new else (c.get("image") or c.get("note") or "no image")
    mark = "" if c["ranked"] else " &dagger;"
    classes = " ".join(x for x in ("cell", "ok" if c["correct"] else "", "new" if new else "", css) if x)
    return (f'<div class="{classes}">{_img(image, alt)}<b>{html.escape(c["label"])}</b><br>'
            f"{'threshold ' if new else 'cos '}{_fmt(score, 3)}{mark}</div>")


def render_rows(rows: list[dict], thumbs: Thumbnails, query_dir, gallery_dir, threshold: float,
                progress: bool) -> str:
    """The gallery of worst queries: query | 5 predictions | the missed truth."""
    items = rows
    if progress and rows:
        from tqdm.auto import tqdm

        items = tqdm(rows, desc="report thumbnails", unit="query")
    out = []
    for r in items:
        meta = [f"<b>{html.escape(r['image'])}</b>"]
        if r["truth"] is not None:
            meta += [f"truth: {html.escape(r['truth'])}", f"species: {html.escape(str(r['species']))}",
                     f"AP@5: {_fmt(r['ap'], 3)}"]
        meta.append(f"top-1 cos: {_fmt(r['top1'], 3)}")
        cells = [f'<div class="cell query">{_img(thumbs.uri(query_dir, r["image"]), r["image"])}query</div>']
        cells += [render_cell(c, thumbs, gallery_dir, threshold) for c in r["cells"]]
        if r["missed"] is not None:
            cells.append(render_cell(r["missed"], thumbs, gallery_dir, threshold, "missed"))
        out.append(f'<div class="row"><div class="meta">{"<br>".join(meta)}</div>{"".join(cells)}</div>')
    return "\n".join(out)


def render_scores(res: dict) -> str:
    """The MAP@5 table: overall, known, new, then one row per species."""
    head = "<tr><th>subset</th><th>images</th><th>MAP@5</th><th>MAP@5 known</th><th>MAP@5 new</th>" \
           "<th>new@1 precision</th><th>new@1 recall</th><th>top-1 known</th></tr>"
    s = res["scores"]
    rows = [("all", s["n"], s["map5"], s["map5_known"], s["map5_new"], s["new_precision_at1"],
             s["new_recall_at1"], s["top1_known"])]
    rows += [(f"species: {x['species']}", x["n"], x["map5"], x["map5_known"], x["map5_new"],
              x["new_precision_at1"], x["new_recall_at1"], x["top1_known"]) for x in res["species"]]
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    hits = " ".join(str(h) for h in s["hits_at_rank"])
    return (f'<table id="scores">{head}{body}</table><p>known {s["n_known"]}, new {s["n_new"]} images; '
            f"first hit at rank 1-5, miss: {hits}</p>")


def render_report(res: dict, query_dir, gallery_dir, thumb_px: int, progress: bool = True) -> str:
    """The whole page as one HTML string."""
    thr = res["threshold"]
    thumbs = Thumbnails(thumb_px)
    gallery_html = render_rows(res["rows"], thumbs, query_dir, gallery_dir, thr["value"], progress)
    plots = [plot_top1_hist(res["top1"], res["is_new"], thr["value"])]
    parts = [f"<h1>whalesub error report</h1><p>{res['n']} queries; predictions from "
             f"{'the submission' if res['submission'] is not None else 'the ranking at the threshold'}; "
             f"new_individual first in {100 * res['pred_new_first']:.1f}% of rows; threshold "
             f"{thr['value']:.4f} ({html.escape(thr['source'])}"
             + (f"; any value in ({thr['lo']:.4f}, {thr['hi']:.4f}] gives the same rows"
                if "lo" in thr else "")
             + ")</p>"]
    if res["has_truth"]:
        plots.insert(0, plot_threshold_curve(res["curve"], thr))
        parts += ["<h2>MAP@5</h2>", render_scores(res)]
    else:
        parts.append("<p>No truth file: candidates and scores only.</p>")
    parts += ['<h2>Threshold and top-1 cosine</h2><div class="plots">'
              + "".join(f'<img src="{p}" alt="plot">' for p in plots) + "</div>"]
    what = ("lowest AP@5 first, then the most confident top-1" if res["has_truth"]
            else "top-1 cosine closest to the threshold")
    parts += [f"<h2>Queries ({res['shown']} of {res['n']} shown: {what})</h2>",
              "<p>Each individual is shown by its best-matching gallery image; green: correct; dashed red: "
              "the truth, missed by the top 5; &dagger;: not among the ranking's candidates (cosine of "
              "the shown image).</p>", gallery_html]
    if thumbs.failed:
        log.warning("%d images could not be read for thumbnails (grey placeholders), e.g. %s",
                    len(thumbs.failed), thumbs.failed[0])
        parts.append(f"<p>{len(thumbs.failed)} images could not be read (grey placeholders), e.g. "
                     f"{html.escape(thumbs.failed[0])}.</p>")
    inputs = "".join(f"<tr><td>{html.escape(i['name'])}</td><td>{html.escape(i['path'])}</td>"
                     f"<td>{i['bytes']}</td><td>{i['modified']}</td></tr>" for i in res["inputs"])
    parts += ["<h2>Command and inputs</h2>", f"<pre id=\"command\">{html.escape(res['command'])}</pre>",
              f"<table><tr><th>input</th><th>path</th><th>bytes</th><th>modified (UTC)</th></tr>{inputs}"
              f"</table><p>k={res['k']}; whalesub {whalesub.__version__}; written "
              f"{datetime.now(UTC).isoformat(timespec='seconds')}</p>"]
    css = CSS.replace("WIDTH", str(thumb_px))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>whalesub report</title>'
            f"<style>{css}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
