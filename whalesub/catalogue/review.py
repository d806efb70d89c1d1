"""The review page of ``catalogue identify``: each query beside its candidates, one HTML file.

Thumbnails come from the report's renderer (:class:`whalesub.report.render.Thumbnails`: embedded
JPEG ``data:`` URIs, a grey placeholder for an unreadable image) and so does the style sheet. Per
query: a row of the best individuals (each shown by its best-matching photo) and a row of the best
images, each with its cosine and calibrated probability; P(new) and the batch group in the margin.
The calibration's reliability tables close the page.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

from whalesub import __version__
from whalesub.catalogue.store import PHOTOS, Catalogue
from whalesub.core.atomic import atomic_write_text
from whalesub.report.render import CSS, Thumbnails


def _cell(uri: str | None, title: str, lines: list[str], css: str = "") -> str:
    img = (
        f'<img src="{uri}" alt="{html.escape(title)}" title="{html.escape(title)}">'
        if uri
        else f'<div class="ph">{html.escape(title)}</div>'
    )
    return f'<div class="cell {css}">{img}{"<br>".join(lines)}</div>'


def _p(c: dict) -> str:
    return f"p {c['p']:.2f}" if "p" in c else "p n/a"


def render_query(path: Path, r: dict, thumbs: Thumbnails, gallery_dir: Path) -> str:
    meta = [
        f"<b>{html.escape(path.name)}</b>",
        "P(new): " + ("n/a" if r["p_new"] is None else f"{r['p_new']:.2f}"),
    ]
    if r["group"]:
        meta.append(f"new-animal group: <b>{html.escape(r['group'])}</b>")
    query = _cell(thumbs.uri(path.parent, path.name), path.name, ["query"], "query")
    inds = [
        _cell(
            thumbs.uri(gallery_dir, c["photo"]),
            c["photo"],
            [f"<b>{html.escape(c['id'])}</b>", f"cos {c['cos']:.3f} {_p(c)}"],
        )
        for c in r["individuals"]
    ]
    imgs = [
        _cell(
            thumbs.uri(gallery_dir, c["photo"]),
            c["photo"],
            [html.escape(c["id"]), f"cos {c['cos']:.3f} {_p(c)}"],
        )
        for c in r["images"]
    ]
    return (
        f'<div class="row"><div class="meta">{"<br>".join(meta)}</div>{query}'
        f'<div><div style="display:flex;gap:6px">{"".join(inds)}</div><small>per individual</small>'
        f'<div style="display:flex;gap:6px">{"".join(imgs)}</div><small>per image</small></div></div>'
    )


def render_reliability(calibration, why: str) -> str:
    if calibration is None:
        return f"<p>No calibration: {html.escape(why)}</p>"
    parts = []
    for kind, rows in calibration.reliability.items():
        body = "".join(
            f"<tr><td>{r['bin']}</td><td>{r['pairs']}</td><td>{r['predicted']:.3f}</td>"
            f"<td>{r['observed']:.3f}</td></tr>"
            for r in rows
        )
        parts.append(
            f"<h3>{kind} (out-of-fold ECE {calibration.ece[kind]:.3f}, "
            f"{calibration.pairs[kind]} pairs)</h3><table><tr><th>p bin</th><th>pairs</th>"
            f"<th>mean predicted</th><th>observed</th></tr>{body}</table>"
        )
    return "\n".join(parts)


def write_review(
    out: Path,
    cat: Catalogue,
    paths: list[Path],
    results: list[dict],
    calibration,
    why: str,
    top: int,
    thumb_px: int = 128,
) -> Path:
    thumbs = Thumbnails(thumb_px)
    rows = "\n".join(
        render_query(p, r, thumbs, cat.folder / PHOTOS) for p, r in zip(paths, results, strict=True)
    )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>catalogue review</title>"
        f"<style>{CSS.replace('WIDTH', str(thumb_px))}</style></head><body>"
        f"<h1>Catalogue review: {len(paths)} photos against {html.escape(str(cat.folder))}</h1>"
        f"<p>Top {top} candidates per individual and per image. Nothing is assigned: record decisions with "
        f"<code>whalesub catalogue confirm PHOTO ID</code> or <code>whalesub catalogue new PHOTO</code>. "
        f"Model {html.escape(cat.fingerprint)}; whalesub {__version__}; {when}.</p>"
        f"{rows}<h2>Calibration: reliability on out-of-fold pairs</h2>"
        f"{render_reliability(calibration, why)}</body></html>"
    )
    atomic_write_text(out, page)
    return out
