"""``imgcluster report RUN``: one self-contained HTML page about a run.

Everything is inline (thumbnails as data URIs, charts as SVG, a few lines of script), so the
file opens offline in any browser and can be mailed around. Sections: the run's settings,
scores (against ground truth when there is some, and without), cluster sizes, a 2-D map of
the embeddings (UMAP when installed, else PCA) with thumbnails, the training curves from
``train.log.jsonl``, and a gallery per cluster, nearest the centre first.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import atomic_write_text
from .evaluation import Evaluation, evaluate
from .labels import Labels, read_labels
from .report import Reporter, counted, show_path
from .runs import unfinished
from .sheets import cluster_members, thumbnail

_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;border:1px solid #ddd;text-align:right}
.gallery img{width:64px;height:64px;margin:2px;image-rendering:pixelated;cursor:zoom-in}
.gallery img.big{width:192px;height:192px}
nav a{margin-right:.6em}.muted{color:#777}svg{background:#fafafa}
"""
_SCRIPT = """
document.querySelectorAll('.gallery img').forEach(function (img) {
  img.addEventListener('click', function () { img.classList.toggle('big'); });
});
var nav = document.getElementById('nav');
document.querySelectorAll('section.cluster').forEach(function (s) {
  var a = document.createElement('a'); a.href = '#' + s.id; a.textContent = s.dataset.cluster;
  nav.appendChild(a);
});
document.body.dataset.ready = '1';
"""


def build_report(
    run: Path,
    out: Path | None = None,
    truth: str = "auto",
    per_cluster: int = 24,
    map_points: int = 2000,
    map_thumbs: int = 120,
    reporter: Reporter | None = None,
) -> Path:
    """Write ``report.html`` (or ``out``) for the run folder ``run``; returns its path."""
    run = Path(run)
    reporter = reporter or Reporter(quiet=True)
    if not (run / "labels.csv").is_file():
        raise unfinished(run, "labels.csv")
    labels = read_labels(run / "labels.csv")
    scores = evaluate(run / "labels.csv", truth=truth, reporter=reporter)
    members = cluster_members(labels)
    with reporter.task("report", total=len(members) + 2) as bar:
        parts = [_header(run, labels), _scores(scores), _sizes(scores)]
        parts.append(_map(run, labels, map_points, map_thumbs))
        bar.advance()
        parts.append(_curves(run))
        bar.advance()
        parts.append("<h2>Clusters</h2>")
        for c, rows in members.items():
            parts.append(_gallery(c, rows, labels, per_cluster))
            bar.advance()
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>imgcluster report: {html.escape(run.name)}</title><style>{_STYLE}</style>"
        f"</head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>\n"
    )
    target = Path(out) if out else run / "report.html"
    atomic_write_text(target, page)
    return target


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_tag(labels: Labels, row: int, size: int = 64) -> str:
    path = labels.paths[row]
    uri = _data_uri(thumbnail(labels.resolve(path), size))
    return f'<img src="{uri}" alt="" title="{html.escape(show_path(path))}">'


def _header(run: Path, labels: Labels) -> str:
    cfg: dict[str, Any] = {}
    if (run / "config.toml").is_file():
        cfg = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    t = cfg.get("train", {})
    items = [
        ("method", t.get("method", "?")),
        ("K", t.get("k", "?")),
        ("images", len(labels)),
        ("seed", t.get("seed", "?")),
        ("device", t.get("device", "?")),
        ("image size", t.get("image_size", "?")),
        ("root", labels.root),
    ]
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(show_path(v))}</td></tr>"
        for k, v in items
    )
    params = ", ".join(f"{k}={v}" for k, v in cfg.get("params", {}).items())
    return (
        f"<h1>imgcluster: {html.escape(run.name)}</h1><nav id=nav></nav><table>{rows}</table>"
        f"<p class=muted>parameters: {html.escape(params) or 'defaults'}</p>"
    )


def _scores(ev: Evaluation) -> str:
    free = (
        f"<p>Without labels: size balance {ev.balance:.3f}, mean confidence "
        f"{ev.mean_confidence:.3f}, silhouette "
        f"{'n/a' if ev.silhouette is None else f'{ev.silhouette:.3f}'}.</p>"
    )
    if ev.acc is None:
        return "<h2>Scores</h2><p class=muted>No ground truth.</p>" + free
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ev.classes or [])
    body = "".join(
        f"<tr><th>{c}</th><td>{html.escape(str((ev.mapping or {}).get(c, '-')))}</td>"
        + "".join(f"<td>{n}</td>" for n in row)
        + "</tr>"
        for c, row in zip(sorted(ev.sizes), ev.confusion or [], strict=False)
    )
    return (
        f"<h2>Scores</h2><p><b>ACC {ev.acc:.4f} &nbsp; NMI {ev.nmi:.4f} &nbsp; ARI {ev.ari:.4f}"
        f"</b> against {html.escape(_truth_name(ev.truth))} "
        f"({counted(ev.scored, 'image')})</p>{free}"
        f"<table><tr><th>cluster</th><th>matched class</th>{head}</tr>{body}</table>"
    )


def _truth_name(truth: str | None) -> str:
    return "folder names" if truth in ("auto", "folders") else str(truth)


def _sizes(ev: Evaluation) -> str:
    sizes = sorted(ev.sizes.items())
    top = max(n for _, n in sizes)
    bar_w, height = 28, 160
    bars = []
    for i, (c, n) in enumerate(sizes):
        h = max(1, round(height * n / top))
        x = 30 + i * (bar_w + 6)
        bars.append(
            f'<rect x="{x}" y="{height - h + 10}" width="{bar_w}" height="{h}" '
            f'fill="{_PALETTE[c % len(_PALETTE)]}"><title>cluster {c}: {n}</title></rect>'
            f'<text x="{x + bar_w / 2}" y="{height + 24}" font-size="11" '
            f'text-anchor="middle">{c}</text>'
        )
    width = 40 + len(sizes) * (bar_w + 6)
    return (
        f"<h2>Cluster sizes</h2><svg width='{width}' height='{height + 32}'>{''.join(bars)}</svg>"
    )


def _project(z: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP when the package is installed, else the first two principal axes."""
    try:
        import umap  # type: ignore[import-not-found]

        return np.asarray(umap.UMAP(random_state=seed).fit_transform(z)), "UMAP"
    except ImportError:
        centred = z - z.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA"


def _map(run: Path, labels: Labels, points: int, thumbs: int) -> str:
    path = run / "embeddings.npy"
    if not path.is_file():
        return "<h2>Map</h2><p class=muted>No embeddings.npy in this run.</p>"
    z = np.load(path, mmap_mode="r", allow_pickle=False)
    if len(z) != len(labels) or z.ndim != 2:
        return "<h2>Map</h2><p class=muted>embeddings.npy does not match labels.csv.</p>"
    rows = np.sort(np.random.default_rng(0).permutation(len(z))[:points])
    xy, how = _project(np.asarray(z[rows], dtype=np.float64))
    span = np.ptp(xy, axis=0)
    xy = (xy - xy.min(0)) / np.where(span > 0, span, 1) * 560 + 20
    dots = [
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" '
        f'fill="{_PALETTE[int(labels.cluster[r]) % len(_PALETTE)]}"/>'
        for (x, y), r in zip(xy, rows, strict=True)
    ]
    pics = [
        f'<image x="{xy[j, 0] - 12:.1f}" y="{xy[j, 1] - 12:.1f}" width="24" height="24" '
        f'href="{_data_uri(thumbnail(labels.resolve(labels.paths[rows[j]]), 32))}"/>'
        for j in range(0, len(rows), max(1, len(rows) // thumbs))
    ]
    return (
        f"<h2>Map of the embeddings ({how})</h2><svg width=600 height=600>{''.join(dots)}"
        f"{''.join(pics)}</svg>"
    )


def _curves(run: Path) -> str:
    path = run / "train.log.jsonl"
    if not path.is_file():
        return ""
    series: dict[str, list[float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "epoch" not in record:
            continue
        phase = record.get("phase", "train")
        for key, value in record.items():
            if key not in ("epoch", "images", "seconds", "images_per_s") and isinstance(
                value, int | float
            ):
                series.setdefault(f"{phase}: {key}", []).append(float(value))
    charts = [_line_chart(name, values) for name, values in series.items() if len(values) > 1]
    if not charts:
        return ""
    return "<h2>Training curves</h2>" + "".join(charts)


def _line_chart(name: str, values: list[float], w: int = 260, h: int = 120) -> str:
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    pts = " ".join(
        f"{10 + i * (w - 20) / (len(values) - 1):.1f},{h - 10 - (v - lo) / span * (h - 30):.1f}"
        for i, v in enumerate(values)
    )
    return (
        f"<svg width={w} height={h}><text x=8 y=14 font-size=11>{html.escape(name)} "
        f"({lo:.4g} .. {hi:.4g})</text><polyline fill=none stroke='#1f77b4' points='{pts}'/></svg>"
    )


def _gallery(c: int, rows: np.ndarray, labels: Labels, per_cluster: int) -> str:
    imgs = "".join(_thumb_tag(labels, int(r)) for r in rows[:per_cluster])
    return (
        f"<section class=cluster id=cluster-{c} data-cluster='{c}'><h3>cluster {c} "
        f"<span class=muted>({counted(len(rows), 'image')})</span></h3>"
        f"<div class=gallery>{imgs}</div></section>"
    )
