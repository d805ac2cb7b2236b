"""The report's HTML page (Jinja2, autoescaped): tables, then figures, each with its settings and
the command that made it. Everything is inline (styles, images as data URIs): the file opens
offline and fetches nothing."""

HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; }
td.best { font-weight: bold; background: #e8f4e8; }
td.sig { color: #8b0000; font-weight: bold; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
code, pre { background: #f5f5f5; padding: 0.1em 0.3em; }
.meta { font-size: 0.9em; color: #444; }
.failed { color: #8b0000; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ meta }}</p>
{% for s in studies %}
<section class="study" id="study-{{ s.name }}">
<h2>{{ s.name }}: {{ s.description }}</h2>
<p class="meta">scale <b>{{ s.scale }}</b>; seeds {{ s.seeds }}; {{ s.n_cells }} cells
{%- if s.wall %}; wall time {{ s.wall }}{% endif %}.
{% if s.command %}Command: <code>{{ s.command }}</code>{% endif %}</p>
{% if s.scale_notes %}<p class="meta">{{ s.scale_notes }}.</p>{% endif %}
{% if s.failed %}<p class="failed">Failed cells: {{ s.failed }}</p>{% endif %}
<table class="results" data-study="{{ s.name }}">
<thead><tr><th>model</th>{% for h in s.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in s.rows %}<tr><td>{{ row.label }}</td>{% for c in row.cells %}<td{% if c.best %} class="best"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
{% if s.note %}<p class="meta">{{ s.note }}</p>{% endif %}
{% if s.diffs %}
<table class="differences" data-study="{{ s.name }}">
<thead><tr><th>difference</th>{% for h in s.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in s.diffs %}<tr><td>{{ row.label }}</td>{% for c in row.cells %}<td{% if c.sig %} class="sig"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
<p class="meta">Best value per column in bold. Values are mean &plusmn; sample standard deviation over
seeds; a difference marked * exceeds the sum of the two spreads.</p>
{% endif %}
</section>
{% endfor %}
<h2>Figures</h2>
{% for f in figures %}
<figure>
<img src="data:image/png;base64,{{ f.data }}" alt="{{ f.title }}">
<figcaption><b>{{ f.title }}.</b> {{ f.caption }}</figcaption>
</figure>
{% endfor %}
</body>
</html>
"""
