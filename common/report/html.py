"""The run report and the comparison of runs as one self-contained HTML file each.

Everything a page shows travels inside it: plots and contact sheets are ``data:`` URIs, the style
sheet is inline, there is no script and no external URL, so the file opens offline, can be mailed
or attached to an issue, and shows the same thing everywhere. Jinja2 (autoescaping) fills the
templates; :mod:`common.report.plots` draws the curves.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape
from PIL import Image

from common.atomic import atomic_write_text
from common.metric_keys import ACCURACY_KEYS, TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5, VAL_ACC
from common.provenance import versions
from common.report import plots
from common.report.run_data import EVAL_LOSS_KEYS, LOSS_KEYS, RunData

log = logging.getLogger(__name__)

MAX_SHEET_WIDTH = 1600  # px; a contact sheet of 1024-px FLUX images is downscaled for the page
REPORT_NAME = "report.html"


def data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_uri(path: Path, max_width: int = MAX_SHEET_WIDTH) -> str | None:
    """A PNG file as a data URI, downscaled to ``max_width``; ``None`` when unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > max_width:
                im = im.resize((max_width, max(1, round(im.height * max_width / im.width))))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError as err:
        log.warning("report: cannot read image %s (%s)", path, err)
        return None
    return data_uri(buf.getvalue())


# ---------------------------------------------------------------------------- figures of one run
def _acc_plots(run: RunData) -> list[dict[str, Any]]:
    figs = []
    curves = {key.replace("_retrieval_acc", "").replace("_", " ") or key: run.series("evaluate", key) for key in ACCURACY_KEYS}
    figs.append(("Global retrieval accuracy (test: both branches, CLIP, T5; val)",
                 plots.line_plot("global retrieval accuracy", curves, ylabel="accuracy", ylim=(0, 1.02))))
    for key, label in ((TEST_ACC, "test"), (TEST_ACC_CLIP, "test, CLIP branch"),
                       (TEST_ACC_T5, "test, T5 branch")):
        per_node = {f"node {n}": run.series("evaluate", key, n) for n in run.nodes}
        figs.append((f"Per-node retrieval accuracy ({label})",
                     plots.line_plot(f"per-node retrieval accuracy ({label})", per_node, ylabel="accuracy", ylim=(0, 1.02))))
    losses = {k: run.series("train", k) for k in LOSS_KEYS}
    losses.update({k: run.series("evaluate", k) for k in EVAL_LOSS_KEYS})
    figs.append(("Global losses (train: weighted mean over nodes; val/test: global adapters)",
                 plots.line_plot("global losses", losses, ylabel="loss")))
    per_node_loss = {f"node {n}": run.series("train", "train_loss", n) for n in run.nodes}
    figs.append(("Per-node train loss", plots.line_plot("per-node train loss", per_node_loss, ylabel="loss")))
    spent = {f"node {n}": run.series("train", "dp_epsilon", n) for n in run.nodes}  # DP sites only: no plot without
    figs.append(("Privacy spent per site (epsilon at the run's delta, the site's whole ledger)",
                 plots.line_plot("privacy spent per site", spent, ylabel="epsilon")))
    return [{"title": t, "src": data_uri(png)} for t, png in figs if png is not None]


def _server_plots(run: RunData) -> list[dict[str, Any]]:
    figs = []
    for step, losses in sorted(run.server_training().items()):
        series = {}
        for loss, points in losses.items():
            series[loss] = (list(range(1, len(points) + 1)), [v for _, _, v in points])
        rounds = sorted({r for points in losses.values() for r, _, _ in points})
        png = plots.line_plot(f"server step '{step}': per-epoch losses over rounds {rounds[0]}-{rounds[-1]}", series,
                              xlabel="epoch (all rounds, in order)", ylabel="loss", markers=False)
        figs.append({"title": f"Server training: {step}", "src": data_uri(png)})
    keys = sorted({k for r in run.rounds for k in ((r.get("train") or {}).get("global") or {})
                   if k.startswith("server_gen_") and not k.endswith(("_seconds", "_samples"))})
    png = plots.line_plot("server generator per round", {k[len("server_gen_"):]: run.series("train", k) for k in keys})
    if png is not None:
        figs.append({"title": "Server generator: last-step losses and teacher agreement per round", "src": data_uri(png)})
    return [f for f in figs if f["src"]]


def _cache_plot(run: RunData) -> dict[str, Any] | None:
    rows = run.cache_rows()
    if not rows:
        return None
    rounds = sorted({r["round"] for r in rows})
    hits = [sum(r["hits"] for r in rows if r["round"] == k) for k in rounds]
    misses = [sum(r["misses"] for r in rows if r["round"] == k) for k in rounds]
    png = plots.stacked_bars("embedding cache, all nodes", [str(k) for k in rounds], {"hits": hits, "misses": misses},
                             xlabel="round", ylabel="clips")
    return {"title": "Embedding cache: hits and misses per round (sum over nodes; per node in the table)", "src": data_uri(png)}


def _generator_plot(run: RunData) -> dict[str, Any] | None:
    series = {f"node {n}": run.series("train", "gen_fd_ratio", n) for n in run.nodes}
    png = plots.line_plot("generator FD ratio per node (1 = as close as real data to itself)", series, ylabel="FD ratio")
    return {"title": "Generator quality over rounds (FD ratio, pooled over classes)", "src": data_uri(png)} if png else None


def _participation(run: RunData) -> dict[str, Any]:
    table = run.participation()
    return {"nodes": run.nodes, "rows": table, "failures": run.failures()}


def _final(run: RunData) -> dict[str, Any]:
    final = run.summary.get("final") or {}
    if not final and run.rounds:
        final = (run.rounds[-1].get("evaluate") or {}).get("global", {}) or {}
    return final


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _env() -> Environment:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["fmt"] = _fmt
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=False, default=str)
    return env


def _context(run: RunData) -> dict[str, Any]:
    info = run.run_info
    sheets = [{"owner": s.owner, "round": s.round, "classes": s.classes, "src": image_uri(s.path),
               "path": str(s.path.relative_to(run.run_dir)) if run.run_dir in s.path.parents else str(s.path)}
              for s in run.contact_sheets()]
    manifest_cols = ["owner", "class_name", "index", "round", "source", "seed", "path", "render_model"]
    return {
        "run": run, "info": info, "final": _final(run),
        "versions": info.get("versions") or {},
        "report_versions": versions(),
        "git_commit": info.get("git_commit") or "",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "acc_plots": _acc_plots(run),
        "server_plots": _server_plots(run),
        "server_metrics": [(r["round"], {k: v for k, v in ((r.get("train") or {}).get("global") or {}).items()
                                         if k.split("_")[0] in ("kd", "finetune", "server")})
                           for r in run.rounds],
        "cache_plot": _cache_plot(run), "cache_rows": run.cache_rows(),
        "generator_plot": _generator_plot(run), "generator_rows": run.generator_quality(),
        "image_rows": run.image_accuracy(),
        "participation": _participation(run),
        "sheets": sheets,
        "manifest_cols": manifest_cols, "manifest": run.manifest,
        "checkpoints": run.checkpoints(),
        "problems": run.problems,
    }


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out``) for a finished, failed or partial run; returns its path."""
    run = RunData.load(run_dir)
    path = Path(out) if out else run.run_dir / REPORT_NAME
    html = _env().from_string(RUN_TEMPLATE).render(**_context(run))
    atomic_write_text(path, html)
    log.info("report: %s (%d kB)", path, len(html) // 1024)
    return path


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One page comparing runs: final metrics side by side and overlaid per-round curves."""
    runs = [RunData.load(d) for d in run_dirs]
    names = _unique_names(runs)
    curves = []
    for key, title in ((TEST_ACC, "global test retrieval accuracy"),
                       (TEST_ACC_CLIP, "global test retrieval accuracy, CLIP branch"),
                       (TEST_ACC_T5, "global test retrieval accuracy, T5 branch"),
                       (VAL_ACC, "global validation retrieval accuracy")):
        png = plots.line_plot(title, {n: r.series("evaluate", key) for n, r in zip(names, runs)}, ylabel="accuracy",
                              ylim=(0, 1.02))
        curves.append({"title": title, "src": data_uri(png)})
    png = plots.line_plot("train loss (weighted mean over nodes)", {n: r.series("train", "train_loss") for n, r in zip(names, runs)},
                          ylabel="loss")
    curves.append({"title": "train loss", "src": data_uri(png)})
    columns = ["status", "rounds", "aggregation", TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5,
               VAL_ACC, "image_acc", "total_seconds"]
    rows = []
    for name, run in zip(names, runs):
        final = _final(run)
        images = {r["owner"]: r.get("image_acc") for r in run.image_accuracy()}
        rows.append({"name": name, "dir": str(run.run_dir), "status": run.status, "rounds": len(run.rounds),
                     "aggregation": run.run_info.get("aggregation", ""),
                     **{k: final.get(k, "") for k in columns if k.endswith("_acc") or "_acc_" in k},
                     "image_acc": images.get("server", ""), "total_seconds": run.run_info.get("total_seconds", "")})
    html = _env().from_string(COMPARE_TEMPLATE).render(
        rows=rows, columns=columns, curves=[c for c in curves if c["src"]], generated=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        problems=[f"{n}: {p}" for n, r in zip(names, runs) for p in r.problems],
    )
    path = Path(out)
    atomic_write_text(path, html)
    log.info("comparison of %d runs: %s", len(runs), path)
    return path


def _unique_names(runs: list[RunData]) -> list[str]:
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.run_dir.parent.name})" for n, r in zip(names, runs)]


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f3f3f3}.ok{color:#176317}.bad{color:#a11}.muted{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}figcaption{font-size:13px;color:#444}
img.plot{max-width:100%;border:1px solid #eee}.sheet img{max-width:100%;image-rendering:pixelated}
pre{background:#f7f7f7;padding:.6em;max-height:30em;overflow:auto;font-size:12px}
.scroll{max-height:28em;overflow:auto}
"""

RUN_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>feda2v run {{ run.name }}</title>
<style>""" + STYLE + """</style></head><body>
<h1>feda2v run <code>{{ run.name }}</code></h1>
<p>Status: <b class="{{ 'ok' if run.status == 'completed' else 'bad' }}">{{ run.status }}</b>
{% if info.error %} &mdash; <span class="bad">{{ info.error }}</span>{% endif %}
&middot; {{ run.rounds|length }} of {{ info.num_rounds or '?' }} rounds
&middot; started {{ info.started or '?' }}{% if info.total_seconds %} &middot; {{ info.total_seconds|fmt }} s{% endif %}
&middot; aggregation <b>{{ info.aggregation or '?' }}</b>
&middot; seed {{ run.config.seed if run.config else '?' }}</p>
{% if problems %}<p class="bad">Not shown (could not be read): {{ problems|join('; ') }}</p>{% endif %}

<h2 id="final">Final metrics</h2>
{% if final %}<div class="grid">{% for chunk in final|dictsort|slice(3) %}<table>{% for k, v in chunk %}
<tr><th>{{ k }}</th><td>{{ v|fmt }}</td></tr>{% endfor %}</table>{% endfor %}</div>
{% else %}<p class="muted">No round finished.</p>{% endif %}

<h2 id="curves">Accuracy and losses per round</h2>
<div class="grid">{% for f in acc_plots %}<figure><img class="plot" src="{{ f.src }}" alt="{{ f.title }}"><figcaption>{{ f.title }}</figcaption></figure>{% endfor %}</div>

<h2 id="participation">Participation and failures</h2>
{% if participation.rows %}<div class="scroll"><table><tr><th>round</th>{% for n in participation.nodes %}<th>node {{ n }}</th>{% endfor %}</tr>
{% for row in participation.rows %}<tr><td>{{ row.round }}</td>{% for n in participation.nodes %}
<td class="{{ 'ok' if row[n] == 'train ok, evaluate ok' else 'bad' }}">{{ row[n] }}</td>{% endfor %}</tr>{% endfor %}</table></div>{% endif %}
{% if participation.failures %}<ul>{% for r, phase, text in participation.failures %}<li>round {{ r }} {{ phase }}: {{ text }}</li>{% endfor %}</ul>
{% else %}<p class="muted">No failed or rejected replies.</p>{% endif %}

<h2 id="cache">Embedding cache and extraction</h2>
{% if cache_plot %}<figure><img class="plot" src="{{ cache_plot.src }}" alt="{{ cache_plot.title }}"><figcaption>{{ cache_plot.title }}</figcaption></figure>
<div class="scroll"><table><tr><th>round</th><th>node</th><th>hits</th><th>misses</th><th>extract s</th><th>load s</th></tr>
{% for r in cache_rows %}<tr><td>{{ r.round }}</td><td>{{ r.node }}</td><td>{{ r.hits }}</td><td>{{ r.misses }}</td><td>{{ r.extract_s|fmt }}</td><td>{{ r.load_s|fmt }}</td></tr>{% endfor %}</table></div>
{% else %}<p class="muted">No cache metrics.</p>{% endif %}

<h2 id="generators">Generator quality</h2>
{% if generator_rows %}{% if generator_plot %}<figure><img class="plot" src="{{ generator_plot.src }}" alt="{{ generator_plot.title }}"><figcaption>{{ generator_plot.title }}</figcaption></figure>{% endif %}
<table><tr><th>node</th><th>round</th><th>class</th><th>FD ratio</th><th>precision</th><th>recall</th><th>density</th><th>coverage</th></tr>
{% for g in generator_rows %}<tr><td>{{ g.node }}</td><td>{{ g.round }}</td><td>{{ g['class'] }}</td><td>{{ g.fd_ratio|fmt if g.fd_ratio is defined }}</td>
<td>{{ g.precision|fmt if g.precision is defined }}</td><td>{{ g.recall|fmt if g.recall is defined }}</td><td>{{ g.density|fmt if g.density is defined }}</td><td>{{ g.coverage|fmt if g.coverage is defined }}</td></tr>{% endfor %}</table>
{% else %}<p class="muted">No node generators in this run.</p>{% endif %}

<h2 id="server">Server training</h2>
{% if server_plots %}<div class="grid">{% for f in server_plots %}<figure><img class="plot" src="{{ f.src }}" alt="{{ f.title }}"><figcaption>{{ f.title }}</figcaption></figure>{% endfor %}</div>
{% else %}<p class="muted">The server trained nothing (aggregation {{ info.aggregation or '?' }}).</p>{% endif %}
{% set keys = server_metrics|map(attribute=1)|map('list')|sum(start=[])|unique|list %}
{% if keys %}<div class="scroll"><table><tr><th>round</th>{% for k in keys %}<th>{{ k }}</th>{% endfor %}</tr>
{% for r, m in server_metrics %}<tr><td>{{ r }}</td>{% for k in keys %}<td>{{ m[k]|fmt if k in m }}</td>{% endfor %}</tr>{% endfor %}</table></div>{% endif %}

<h2 id="images">Images</h2>
{% if image_rows %}<h3>Image accuracy from sound</h3><table><tr><th>owner</th>{% for k in image_rows[0] if k != 'owner' %}<th>{{ k }}</th>{% endfor %}</tr>
{% for r in image_rows %}<tr><td>{{ r.owner }}</td>{% for k in image_rows[0] if k != 'owner' %}<td>{{ r[k]|fmt if r[k] is defined }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% for s in sheets %}<figure class="sheet"><figcaption><b>{{ s.owner }}</b>{% if s.round %} (round {{ s.round }}){% endif %}: rows = {{ s.classes|join(', ') }} <span class="muted">{{ s.path }}</span></figcaption>
{% if s.src %}<img src="{{ s.src }}" alt="contact sheet {{ s.owner }}">{% else %}<p class="bad">unreadable</p>{% endif %}</figure>{% else %}<p class="muted">No images rendered.</p>{% endfor %}
{% if manifest %}<h3>Manifest ({{ manifest|length }} images)</h3><div class="scroll"><table><tr>{% for c in manifest_cols %}<th>{{ c }}</th>{% endfor %}</tr>
{% for e in manifest %}<tr>{% for c in manifest_cols %}<td>{{ e[c] if e[c] is defined }}</td>{% endfor %}</tr>{% endfor %}</table></div>{% endif %}

<h2 id="checkpoints">Checkpoints and artifacts</h2>
{% if checkpoints %}<div class="scroll"><table><tr><th>file</th><th>kind</th><th>round</th><th>bytes</th></tr>
{% for c in checkpoints %}<tr><td>{{ c.path }}</td><td>{{ c.kind }}</td><td>{{ c.round if c.round is not none }}</td><td>{{ '{:,}'.format(c.bytes) }}</td></tr>{% endfor %}</table></div>
{% else %}<p class="muted">None written.</p>{% endif %}

<h2 id="provenance">Configuration and versions</h2>
<p>Config hash <code>{{ info.config_hash or '?' }}</code> &middot; git commit <code>{{ git_commit or 'not recorded (the app ran from an installed FAB, which has no git metadata)' }}</code></p>
<table><tr><th>package</th><th>at run time</th><th>at report time</th></tr>
{% for k, v in report_versions.items() %}<tr><td>{{ k }}</td><td>{{ versions[k] if k in versions else '' }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
<details><summary>config.json</summary><pre>{{ run.config|tojson_pretty }}</pre></details>
<p class="muted">Generated {{ generated }} from {{ run.run_dir }} by <code>feda2v report</code>.</p>
</body></html>
"""

COMPARE_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>feda2v: {{ rows|length }} runs compared</title>
<style>""" + STYLE + """</style></head><body>
<h1>feda2v: {{ rows|length }} runs compared</h1>
{% if problems %}<p class="bad">Not shown (could not be read): {{ problems|join('; ') }}</p>{% endif %}
<h2>Final metrics</h2>
<table><tr><th>run</th>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in rows %}<tr><td title="{{ r.dir }}">{{ r.name }}</td>{% for c in columns %}<td>{{ r[c]|fmt }}</td>{% endfor %}</tr>{% endfor %}</table>
<h2>Per round</h2>
<div class="grid">{% for f in curves %}<figure><img class="plot" src="{{ f.src }}" alt="{{ f.title }}"><figcaption>{{ f.title }}</figcaption></figure>{% endfor %}</div>
<p class="muted">Generated {{ generated }} by <code>feda2v report</code>.</p>
</body></html>
"""
