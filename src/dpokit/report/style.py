"""The report's stylesheet, inlined into the page so the HTML file stands alone.

System fonts only (no web fonts to fetch); two chart columns on a wide screen,
one on a narrow one; colours chosen so that the verdict and the severity of
each diagnosis read before any text does, and the page prints cleanly.
"""

CSS = """
:root { --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --card: #ffffff; --bg: #f1f5f9;
        --ok: #15803d; --ok-bg: #dcfce7; --warn: #b45309; --warn-bg: #fef3c7; --stop: #b91c1c; --stop-bg: #fee2e2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 24px 20px 40px; }
h1 { font-size: 22px; margin: 0; word-break: break-all; }
h2 { font-size: 17px; margin: 28px 0 10px; }
h3 { font-size: 14px; margin: 0 0 4px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
header.card { display: grid; gap: 10px; padding: 18px 20px; }
.title-row { display: flex; align-items: center; gap: 14px; flex-wrap: wrap; }
.kicker { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .06em; }
.verdict { font-weight: 700; font-size: 13px; padding: 3px 12px; border-radius: 999px; text-transform: uppercase;
           letter-spacing: .04em; }
.verdict.healthy { color: var(--ok); background: var(--ok-bg); }
.verdict.warnings { color: var(--warn); background: var(--warn-bg); }
.verdict.stopped { color: var(--stop); background: var(--stop-bg); }
.verdict.no-metrics { color: var(--muted); background: var(--line); }
.meta { color: var(--muted); margin: 0; }
.meta b { color: var(--ink); font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(115px, 1fr)); gap: 8px; }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: 6px 10px; }
.tile .label { color: var(--muted); font-size: 12px; }
.tile .value { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
nav { display: flex; gap: 16px; font-size: 13px; }
nav a { color: var(--muted); text-decoration: none; }
nav a:hover { color: var(--ink); }
.notes { background: #f8fafc; border: 1px dashed #cbd5e1; border-radius: 8px; padding: 8px 14px; margin: 12px 0 0;
         color: #334155; }
.notes ul { margin: 4px 0; padding-left: 18px; }
.source { color: var(--muted); margin: 0 0 10px; }
.diag { border-left: 4px solid var(--warn); margin-bottom: 10px; }
.diag.stop { border-left-color: var(--stop); }
.diag .sev { font-size: 11px; font-weight: 700; padding: 1px 8px; border-radius: 999px; margin-right: 8px;
             color: var(--warn); background: var(--warn-bg); text-transform: uppercase; }
.diag.stop .sev { color: var(--stop); background: var(--stop-bg); }
.diag p { margin: 6px 0 0; }
.diag .todo { color: #334155; }
.all-clear { border-left: 4px solid var(--ok); }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
@media (max-width: 860px) { .grid { grid-template-columns: 1fr; } }
.plot .about { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.plot .empty { color: var(--muted); font-style: italic; padding: 30px 0; text-align: center;
               border: 1px dashed var(--line); border-radius: 8px; margin-top: 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; color: #334155; margin: 2px 0 4px; }
.swatch { display: inline-block; width: 22px; height: 0; border-top: 2.5px solid; vertical-align: middle; margin-right: 5px; }
.swatch.dashed { border-top-style: dashed; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart .gridline { stroke: #eef2f7; stroke-width: 1; }
svg.chart .frame { fill: none; stroke: #cbd5e1; stroke-width: 1; }
svg.chart .xtick { stroke: #cbd5e1; }
svg.chart .tick, svg.chart .axis-label { fill: var(--muted); font-size: 11px; font-family: inherit; }
svg.chart .rule { stroke-dasharray: 3 3; stroke-width: 1.2; }
svg.chart .rule-label { font-size: 10.5px; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
svg.chart .marker { stroke-dasharray: 4 3; stroke-width: 1.5; opacity: .8; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 10px 4px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12.5px; }
td.num, th.num { text-align: right; }
table.kv { width: auto; min-width: 70%; }
table.kv th { padding-right: 28px; white-space: nowrap; }
.split-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 14px; }
.split-grid h3 { margin-bottom: 8px; }
.split-grid table + table { margin-top: 12px; }
.config { background: #0f172a; color: #e2e8f0; padding: 14px 16px; border-radius: 8px;
           columns: 3 250px; column-gap: 28px; }
.config pre { margin: 0 0 8px; line-height: 1.45; break-inside: avoid; white-space: pre-wrap;
              overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; text-align: center; }
@media print { body { background: #fff; } .card { break-inside: avoid; } nav { display: none; } }
"""
