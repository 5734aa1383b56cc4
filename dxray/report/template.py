"""The report's Jinja2 templates (kept in a module, not data files, so they ship with any install).

Four kinds of page share one head (:data:`PAGES`): the index (run header, the sortable class summary,
a summary of the neuron tasks), one page per class (its explanation and feature images), the
neuron pages, and ``dxray compare``'s page of two runs. Autoescaping is on for every template: every value from the run (class names, errors,
prompts) is escaped. No external resources: each page's one ``<style>`` and, on the index, its one
``<script>`` are constants of this module, allowed by their SHA-256 in the page's Content-Security-Policy
(:func:`csp`); nothing else may run, load or be styled inline.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = r"""
:root { --fg:#1d2330; --muted:#5d6677; --line:#dde1e8; --bg:#fff; --alt:#f5f7fa;
        --core:#1f7a3a; --core-bg:#e3f4e8; --spur:#b3261e; --spur-bg:#fbe4e2; --warn:#8a5a00; --warn-bg:#fff1cc; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 1400px; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 0 0 .5rem; }
h3 { font-size: 1.05rem; margin: 1rem 0 .4rem; }
h4 { font-size: .95rem; margin: .8rem 0 .3rem; }
a { color: #1a56b0; }
nav.pages { display: flex; gap: 1rem; flex-wrap: wrap; margin: 0 0 1rem; }
.meta { color: var(--muted); margin: 0 0 1.25rem; }
.meta span + span::before { content: " · "; }
.detection-prompt.chosen { font-weight: 600; }
.concepts { font-size: .85rem; font-style: italic; }
table.summary { border-collapse: collapse; width: 100%; margin-bottom: 2rem; }
.summary th, .summary td { border-bottom: 1px solid var(--line); padding: .35rem .6rem; text-align: left; }
.summary td.num, .summary th.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary tbody tr:nth-child(even) { background: var(--alt); }
.summary th { background: #eef1f6; position: sticky; top: 0; white-space: nowrap; }
.summary th.js { cursor: pointer; user-select: none; }
.summary th.js::after { content: " \2195"; color: #9aa3b2; }
.summary th[aria-sort=ascending]::after { content: " \2191"; color: var(--fg); }
.summary th[aria-sort=descending]::after { content: " \2193"; color: var(--fg); }
.summary td.error { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem;
                    white-space: pre-wrap; word-break: break-word; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: .7rem; font-size: .8rem; font-weight: 600;
         white-space: nowrap; }
.badge.core { color: var(--core); background: var(--core-bg); }
.badge.spurious { color: var(--spur); background: var(--spur-bg); }
.badge.biased { color: var(--warn); background: var(--warn-bg); }
.badge.unsure { color: var(--warn); background: var(--warn-bg); border: 1px dashed var(--warn); }
.badge.unreliable { color: #fff; background: var(--warn); }
.badge.unexplained { color: var(--muted, #555); background: #eee; }
.badge.none { color: var(--muted); background: var(--alt); }
.badge.error { color: #fff; background: var(--spur); }
section.class, section.neurons { border-top: 2px solid var(--line); padding: 1rem 0 .5rem; }
.task { margin: .4rem 0 .8rem; content-visibility: auto; contain-intrinsic-size: auto 160px; }
.task-head { display: flex; gap: .6rem; align-items: baseline; flex-wrap: wrap; }
.task-head .stats { color: var(--muted); font-size: .85rem; }
.prompt { margin: .25rem 0; font-size: .9rem; }
.prompt q { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--alt); padding: 0 .3rem; }
.error-box { border-left: 4px solid var(--spur); background: var(--spur-bg); padding: .3rem .6rem; margin: .3rem 0;
             font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; white-space: pre-wrap;
             word-break: break-word; }
.images { display: flex; flex-wrap: wrap; gap: .5rem; }
figure { margin: 0; text-align: center; }
figure img { display: block; width: 96px; height: auto; background: var(--alt); border: 1px solid var(--line); }
figure .broken { display: block; width: 96px; padding: 1rem 0; color: var(--muted); background: var(--alt);
                 font-size: .75rem; }
figcaption { font-size: .75rem; color: var(--muted); font-variant-numeric: tabular-nums; }
.empty { color: var(--muted); font-style: italic; }
.top { font-size: .8rem; margin-left: .5rem; }
"""
STYLE = "\n" + "}\n".join(" ".join(rule.split()) for rule in STYLE.strip().split("}\n")) + "\n"  # a rule a line

SCRIPT = r"""
(function () {
  "use strict";
  function key(cell) {
    var v = cell.getAttribute("data-sort");
    if (v === null) { v = cell.textContent.trim(); }
    var n = Number(v);
    return (v !== "" && isFinite(n)) ? {num: true, v: n} : {num: false, v: v.toLowerCase()};
  }
  function compare(a, b) {
    if (a.num && b.num) { return a.v - b.v; }
    if (a.num !== b.num) { return a.num ? -1 : 1; }
    return a.v < b.v ? -1 : (a.v > b.v ? 1 : 0);
  }
  function sortBy(table, col, th) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var keyed = Array.prototype.map.call(body.rows, function (r, i) { return [key(r.cells[col]), i, r]; });
    keyed.sort(function (a, b) {
      var c = compare(a[0], b[0]);
      return (asc ? c : -c) || a[1] - b[1];
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.classList.add("js");
      th.tabIndex = 0;
      th.title = "sort";
      th.addEventListener("click", function () { sortBy(table, col, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, col, th); }
      });
    });
  });
})();
"""


def source_hash(text: str) -> str:
    """A CSP source expression for an inline element whose content is exactly ``text``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def csp(script: bool) -> str:
    """The page's policy: nothing loads but ``data:`` images; only this module's style and script apply."""
    return "; ".join([
        "default-src 'none'", "img-src data:", f"style-src {source_hash(STYLE)}",
        f"script-src {source_hash(SCRIPT)}" if script else "script-src 'none'",
        "base-uri 'none'", "form-action 'none'",
    ])


BASE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{{ policy }}">
<meta name="referrer" content="no-referrer">
<title>{% block title %}{% endblock %}</title>
<style>{{ style }}</style>
</head>
<body>
{%- block body %}{% endblock %}
{%- if script %}
<script>{{ script }}</script>
{%- endif %}
</body>
</html>
"""

MACROS = r"""
{%- macro meta(run) %}
<p class="meta">
<span>run <code>{{ run.run_id }}</code></span>
{%- if run.generator %}<span>generator {{ run.generator }}</span>{% endif %}
{%- if run.classifier %}<span>classifier {{ run.classifier }}</span>{% endif %}
{%- if run.delta is not none %}<span>&delta; = {{ "%.3g"|format(run.delta) }} (core when mean r &ge; &delta;)</span>
<span>low confidence: fewer than {{ "%.0f"|format(100 * run.low_confidence) }}% of {{ run.resamples }} bootstrap resamples of r give the verdict, or one image</span>{% endif %}
<span>{{ run.n_ok }} tasks ok{% if run.n_failed %}, <strong>{{ run.n_failed }} failed</strong>{% endif %}</span>
<span>{{ run.n_samples }} images</span>
{%- if run.finished %}<span>finished {{ run.finished }}</span>{% endif %}
</p>
{%- endmacro %}

{%- macro nav(links) %}
<nav class="pages">
{%- for label, href in links %}{% if href %}<a href="{{ href }}">{{ label }}</a>{% endif %}{% endfor %}
</nav>
{%- endmacro %}

{%- macro images(task) %}
{%- if task.images %}
<div class="images">
{%- for im in task.images %}
<figure class="sample" data-r="{{ "%.3f"|format(im.r) if im.r is not none else '' }}" data-seed="{{ im.seed }}">
<a href="{{ im.href }}">{% if im.src %}<img src="{{ im.src }}" loading="lazy" width="{{ im.width }}" height="{{ im.height }}" alt="{{ im.alt }}">{% else %}<span class="broken">unreadable thumbnail</span>{% endif %}</a>
<figcaption>r {{ "%.2f"|format(im.r) if im.r is not none else "–" }}{% if im.prob is not none %} · p {{ "%.2f"|format(im.prob) }}{% endif %}</figcaption>
</figure>
{%- endfor %}
</div>
{%- elif task.status == "ok" %}<p class="empty">no images stored</p>
{%- endif %}
{%- endmacro %}

{%- macro task_block(t) %}
<div class="task {{ t.kind }}" data-kind="{{ t.kind }}" data-status="{{ t.status }}"{% if t.feature_index is not none %} data-feature="{{ t.feature_index }}"{% endif %} data-template="{{ t.template }}"{% if t.verdict %} data-verdict="{{ t.verdict.verdict }}"{% endif %}{% if t.anchor %} id="{{ t.anchor }}"{% endif %}>
<div class="task-head">
{%- if t.kind == "feature" %}<strong>#{{ t.rank if t.rank is not none else "?" }} · feature {{ t.feature_index }}</strong>
{%- elif t.kind == "neuron" %}<strong>neuron {{ t.layer }}:{{ t.feature_index }}</strong>
{%- elif t.kind == "control" %}<strong>plain prompt <code>{{ t.template }}</code></strong> <span class="stats">not optimised: does the segmenter find the object when it is drawn?</span>
{%- else %}<strong>class explanation</strong>{% endif %}
{%- if t.status != "ok" %} <span class="badge error">failed</span>
{%- elif t.verdict %} <span class="badge {{ t.verdict.badge }} verdict" data-verdict="{{ t.verdict.verdict }}"{% if t.verdict.badge == "unexplained" %} title="these images drive the feature to {{ "%.3g"|format(t.verdict.activation) }} on average, below the {{ "%.3g"|format(t.verdict.control_activation) }} of the class's plain pictures: the optimisation did not find what the feature responds to, so its r says nothing"{% elif t.verdict.std is not none %} title="mean r {{ "%.3f"|format(t.verdict.mean) }} ± {{ "%.3f"|format(t.verdict.std) }} over {{ t.verdict.n }} images"{% endif %}>{{ t.verdict.verdict }} · mean r {{ "%.3f"|format(t.verdict.mean) if t.verdict.mean is not none else "–" }}</span>
{%- if t.verdict.low is not none %} <span class="stats interval">95% interval {{ "%.3f"|format(t.verdict.low) }}–{{ "%.3f"|format(t.verdict.high) }} · confidence {{ "%.0f"|format(100 * t.verdict.confidence) }}%</span>{% endif %}
{%- if t.verdict.unsure %} <span class="badge unsure" data-confidence="{{ "%.3f"|format(t.verdict.confidence) if t.verdict.confidence is not none else '' }}" title="{% if t.verdict.confidence is not none %}only {{ "%.0f"|format(100 * t.verdict.confidence) }}% of the bootstrap resamples of r give this verdict{% else %}one image: no interval{% endif %}">low confidence</span>{% endif %}
{%- elif t.kind == "feature" %} <span class="badge none">no verdict</span>
{%- endif %}
{%- if t.concepts %} <span class="concepts" data-concepts="{{ t.concepts|map(attribute='name')|join(',') }}" title="the concepts covering most of these images (segment.concepts), mean share of the image">{{ "shows" if not t.verdict else t.verdict.verdict }}: {% for k in t.concepts %}{{ k.name }} {{ "%.2f"|format(k.fraction) if k.fraction is not none else "–" }}{{ ", " if not loop.last }}{% endfor %}</span>{% endif %}
<span class="stats">{{ t.stats|join(" · ") }}</span>
</div>
{%- if t.status != "ok" %}<div class="error-box">{{ t.error or "failed (no error recorded)" }}</div>{% endif %}
{%- if t.prompt %}<p class="prompt">learned prompt: <q>{{ t.prompt }}</q></p>{% endif %}
{{ images(t) }}
</div>
{%- endmacro %}
"""

INDEX = r"""{% extends "base" %}{% from "macros" import meta %}
{%- block title %}dxray report · {{ run.run_id }}{% endblock %}
{%- block body %}
<header>
<h1>dxray report</h1>
{{ meta(run) }}
</header>

<h2 id="summary">Classes</h2>
<table class="summary sortable" id="summary-table">
<thead><tr>
<th class="num" aria-sort="ascending">class</th>
<th>name</th>
{%- if run.several_templates %}<th>template</th>{% endif %}
<th class="num">spurious</th>
<th class="num">features</th>
<th class="num" title="features whose verdict is low confidence">unsure</th>
<th class="num">class r</th>
<th>hint</th>
{%- if run.n_failed %}<th class="num">failed</th>{% endif %}
</tr></thead>
<tbody>
{%- for row in summary %}
<tr data-class="{{ row.class_index }}"{% if row.row_id %} id="{{ row.row_id }}"{% endif %}>
<td class="num" data-sort="{{ row.class_index }}">{{ row.class_index }}</td>
<td data-sort="{{ row.name }}"><a href="{{ row.href }}">{{ row.name }}</a></td>
{%- if run.several_templates %}<td><code>{{ row.template }}</code></td>{% endif %}
<td class="num" data-sort="{{ row.n_spurious if row.n_spurious is not none else '' }}">{{ row.n_spurious if row.n_spurious is not none else "–" }}</td>
<td class="num" data-sort="{{ row.n_features if row.n_features is not none else '' }}">{{ row.n_features if row.n_features is not none else "–" }}</td>
<td class="num unsure" data-sort="{{ row.n_unsure if row.n_unsure is not none else '' }}">{{ row.n_unsure if row.n_unsure is not none else "–" }}</td>
<td class="num" data-sort="{{ row.r if row.r is not none else '' }}">{{ "%.3f"|format(row.r) if row.r is not none else "–" }}</td>
<td data-sort="{{ (1 if row.biased else 0) + (2 if row.unreliable else 0) }}">{% if row.biased %}<span class="badge biased" title="class r &lt; &delta;: the class explanation barely shows the object">biased?</span>{% endif %}{% if row.unexplained %}<span class="badge unexplained" title="the classifier reads the class explanation as the class with mean probability {{ "%.2f"|format(row.class_prob) if row.class_prob is not none else "–" }} &lt; 0.5: the optimisation did not find what it responds to, so its r says nothing">not explained</span>{% endif %}{% if row.unreliable %} <span class="badge unreliable" title="segmenter control r {{ "%.3f"|format(row.control_r) if row.control_r is not none else "–" }} &lt; &delta;: the segmenter does not find this class's object in the generator's plain pictures of it">unreliable</span>{% endif %}</td>
{%- if run.n_failed %}<td class="num" data-sort="{{ row.n_failed }}">{{ row.n_failed or "" }}</td>{% endif %}
</tr>
{%- endfor %}
</tbody>
</table>

{%- if neurons %}
<h2 id="neurons">Neurons</h2>
<table class="summary neuron-summary">
<thead><tr><th>neuron</th>{% if run.several_templates %}<th>template</th>{% endif %}<th>status</th><th>result</th></tr></thead>
<tbody>
{%- for t in neurons %}
<tr data-kind="neuron" data-status="{{ t.status }}">
<td><a href="{{ t.href }}">neuron {{ t.layer }}:{{ t.feature_index }}</a></td>
{%- if run.several_templates %}<td><code>{{ t.template }}</code></td>{% endif %}
<td>{% if t.status != "ok" %}<span class="badge error">failed</span>{% else %}ok{% endif %}</td>
{%- if t.status != "ok" %}<td class="error">{{ t.error or "failed (no error recorded)" }}</td>
{%- else %}<td>{{ t.stats|join(" · ") }}</td>{% endif %}
</tr>
{%- endfor %}
</tbody>
</table>
{%- endif %}
{%- endblock %}
"""

CLASS = r"""{% extends "base" %}{% from "macros" import meta, nav, task_block %}
{%- block title %}{{ c.class_index }} · {{ c.name }} · dxray report · {{ run.run_id }}{% endblock %}
{%- block body %}
{{ nav(links) }}
{{ meta(run) }}
<section class="class" id="{{ c.anchor }}" data-class="{{ c.class_index }}">
<h2>{{ c.class_index }} · {{ c.name }}<a class="top" href="{{ links[0][1] }}">↑ summary</a></h2>
{%- if c.unreliable %}
<p class="meta"><span class="badge unreliable" data-control="{{ "%.3f"|format(c.control_r) if c.control_r is not none else '' }}">unreliable</span> the segmenter found little of a {{ c.name }} in the generator's plain pictures of it (control r {{ "%.3f"|format(c.control_r) if c.control_r is not none else "–" }} &lt; &delta;): this class's verdicts say more about the segmenter than about the classifier</p>
{%- endif %}
{%- for g in c.groups %}
<div class="template-group" id="{{ g.anchor }}" data-template="{{ g.template }}">
{%- if run.several_templates %}<h3>template <code>{{ g.template }}</code></h3>{% endif %}
<p class="meta">
<span>class r {{ "%.3f"|format(g.r) if g.r is not none else "–" }}{% if g.biased %} <span class="badge biased">biased?</span>{% endif %}{% if g.unexplained %} <span class="badge unexplained" title="the classifier reads the class explanation as the class with mean probability {{ "%.2f"|format(g.class_prob) if g.class_prob is not none else "–" }} &lt; 0.5: the optimisation did not find what it responds to, so its r says nothing">not explained</span>{% endif %}</span>
{%- if g.n_features is not none %}<span>{{ g.n_spurious }} of {{ g.n_features }} features spurious{% if g.n_unexplained %}, {{ g.n_unexplained }} not explained{% endif %}</span>{% endif %}
{%- if g.n_unsure %}<span><span class="badge unsure count">{{ g.n_unsure }} low confidence</span></span>{% endif %}
</p>
{%- for t in g.class_tasks %}{{ task_block(t) }}{% endfor %}
{%- if g.features %}
<h4>top features</h4>
{%- for t in g.features %}{{ task_block(t) }}{% endfor %}
{%- endif %}
{%- if g.neurons %}
<h4>neurons</h4>
{%- for t in g.neurons %}{{ task_block(t) }}{% endfor %}
{%- endif %}
</div>
{%- endfor %}
{%- if c.control %}
<div class="control-group" id="control-{{ c.class_index }}">
<h4>segmenter control{% if c.control_r is not none %} · r {{ "%.3f"|format(c.control_r) }}{% endif %}</h4>
{%- if c.candidates %}
<p class="meta detection-prompts">detection prompts, by mean r on these images (the highest decides the verdicts):
{%- for d in c.candidates %} <span class="detection-prompt{{ ' chosen' if d.chosen }}" data-r="{{ "%.3f"|format(d.r) if d.r is not none else '' }}">{{ d.prompt }} ({{ "%.3f"|format(d.r) if d.r is not none else "–" }}){{ ' ✓' if d.chosen }}</span>{% endfor %}</p>
{%- endif %}
{{ task_block(c.control) }}
</div>
{%- endif %}
</section>
{{ nav(links) }}
{%- endblock %}
"""

NEURONS = r"""{% extends "base" %}{% from "macros" import meta, nav, task_block %}
{%- block title %}neurons {{ part }} · dxray report · {{ run.run_id }}{% endblock %}
{%- block body %}
{{ nav(links) }}
{{ meta(run) }}
<section class="neurons" id="neurons">
<h2>Neurons{% if parts > 1 %} ({{ part }} of {{ parts }}){% endif %}<a class="top" href="{{ links[0][1] }}">↑ summary</a></h2>
{%- for t in neurons %}{{ task_block(t) }}{% endfor %}
</section>
{{ nav(links) }}
{%- endblock %}
"""

COMPARE = r"""{% extends "base" %}
{%- block title %}dxray comparison · {{ c.run_a }} → {{ c.run_b }}{% endblock %}
{%- block body %}
<header>
<h1>dxray comparison</h1>
<p class="meta">
<span>RUN_A <code>{{ c.run_a }}</code> · classifier {{ classifier_a }}</span>
<span>RUN_B <code>{{ c.run_b }}</code> · classifier {{ classifier_b }}</span>
</p>
<p class="meta" id="scope">
{%- if c.features_comparable %}<span>same classifier: features compared one by one</span>
{%- else %}<span class="not-comparable">different classifiers: their penultimate features are different units, so only classes are compared (new spurious = more spurious features among the top k)</span>{% endif %}
<span>{{ c.class_rows()|length }} classes compared</span>
{%- if c.only_a %}<span>{{ c.only_a|length }} classes only in RUN_A</span>{% endif %}
{%- if c.only_b %}<span>{{ c.only_b|length }} classes only in RUN_B</span>{% endif %}
</p>
{%- for cond in fail_on %}
<p class="meta gate" data-condition="{{ cond }}" data-failed="{{ 'true' if offenders[cond] else 'false' }}"><span class="badge {{ 'error' if offenders[cond] else 'core' }}">--fail-on {{ cond }}: {{ 'fail' if offenders[cond] else 'pass' }}</span>{% if offenders[cond] %} classes {{ offenders[cond]|join(", ") }}{% endif %}</p>
{%- endfor %}
</header>

<h2 id="classes">Classes</h2>
<table class="summary sortable" id="classes-table">
<thead><tr>
<th class="num" aria-sort="ascending">class</th><th>name</th><th>template</th>
<th class="num">r A</th><th class="num">r B</th><th class="num">change in r</th><th>bias</th>
<th class="num">spurious A</th><th class="num">spurious B</th><th class="num">new spurious</th><th class="num">new core</th>
</tr></thead>
<tbody>
{%- for r in c.class_rows() %}
<tr data-class="{{ r.class_index }}" data-change="{{ r.change }}" data-new-spurious="{{ r.n_new_spurious if r.n_new_spurious is not none else '' }}">
<td class="num">{{ r.class_index }}</td><td>{{ r.class_name or "" }}</td><td><code>{{ r.template }}</code></td>
<td class="num" data-sort="{{ r.r_a if r.r_a is not none else '' }}">{{ "%.3f"|format(r.r_a) if r.r_a is not none else "–" }}{% if r.biased_a %} <span class="badge biased">biased?</span>{% endif %}</td>
<td class="num" data-sort="{{ r.r_b if r.r_b is not none else '' }}">{{ "%.3f"|format(r.r_b) if r.r_b is not none else "–" }}{% if r.biased_b %} <span class="badge biased">biased?</span>{% endif %}</td>
<td class="num" data-sort="{{ r.r_change if r.r_change is not none else '' }}">{{ "%+.3f"|format(r.r_change) if r.r_change is not none else "–" }}</td>
<td>{% if r.change == "newly biased" %}<span class="badge spurious">newly biased</span>{% elif r.change == "no longer biased" %}<span class="badge core">no longer biased</span>{% endif %}</td>
<td class="num">{{ r.n_spurious_a if r.n_spurious_a is not none else "–" }}</td>
<td class="num">{{ r.n_spurious_b if r.n_spurious_b is not none else "–" }}</td>
<td class="num">{{ r.n_new_spurious if r.n_new_spurious is not none else "–" }}</td>
<td class="num">{{ r.n_new_core if r.n_new_core is not none else "–" }}</td>
</tr>
{%- endfor %}
</tbody>
</table>
{%- if c.features_comparable %}
{%- set flipped = c.feature_rows()|rejectattr("change", "equalto", "same")|list %}
<h2 id="features">Features whose verdict changed</h2>
<p class="meta"><span>{{ flipped|length }} of {{ c.feature_rows()|length }} features compared</span></p>
{%- if flipped %}
<table class="summary sortable" id="features-table">
<thead><tr>
<th class="num" aria-sort="ascending">class</th><th>name</th><th class="num">feature</th><th class="num">rank B</th>
<th>A</th><th>B</th><th class="num">mean r A (95% interval)</th><th class="num">mean r B (95% interval)</th>
</tr></thead>
<tbody>
{%- for f in flipped %}
<tr data-class="{{ f.class_index }}" data-feature="{{ f.feature_index }}" data-change="{{ f.change }}">
<td class="num">{{ f.class_index }}</td><td>{{ f.class_name or "" }}</td><td class="num">{{ f.feature_index }}</td>
<td class="num">{{ f.feature_rank if f.feature_rank is not none else "–" }}</td>
<td><span class="badge {{ f.verdict_a|replace("not explained", "unexplained") }}">{{ f.verdict_a }}</span></td><td><span class="badge {{ f.verdict_b|replace("not explained", "unexplained") }}">{{ f.verdict_b }}</span></td>
<td class="num" data-sort="{{ f.r_a if f.r_a is not none else '' }}">{{ "%.3f"|format(f.r_a) if f.r_a is not none else "–" }}{% if f.r_low_a is not none %} ({{ "%.3f"|format(f.r_low_a) }}–{{ "%.3f"|format(f.r_high_a) }}){% endif %}</td>
<td class="num" data-sort="{{ f.r_b if f.r_b is not none else '' }}">{{ "%.3f"|format(f.r_b) if f.r_b is not none else "–" }}{% if f.r_low_b is not none %} ({{ "%.3f"|format(f.r_low_b) }}–{{ "%.3f"|format(f.r_high_b) }}){% endif %}</td>
</tr>
{%- endfor %}
</tbody>
</table>
{%- endif %}
{%- endif %}
{%- endblock %}
"""

PAGES = {"base": BASE, "macros": MACROS, "index": INDEX, "class": CLASS, "neurons": NEURONS, "compare": COMPARE}
