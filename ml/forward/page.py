"""The forward-test page: live NAV against the backtest band, the monitoring rules, the ledger.

One self-contained HTML file (the figure embedded), regenerated on every run, logged to the
segment's MLflow run and linked from the Airflow task.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import pandas as pd  # noqa: E402

from ml.forward.ledger import BarRow, Segment  # noqa: E402

STATUS_COLOR = {"ok": "#1a7f37", "breach": "#cf222e", "not judged": "#6e7781"}


def nav_figure(rows: list[BarRow], band: pd.DataFrame, title: str) -> str:
    """Live NAV over the bars of the segment, with the backtests' NAV quantiles after as many bars; a PNG data URI."""
    times = pd.to_datetime([row.bar_time for row in rows])
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    shown = band[band["bars"] < len(rows)]
    if len(shown):
        stamps = times[shown["bars"].to_numpy()]
        ax.fill_between(stamps, shown["low"], shown["high"], color="#8fb8de", alpha=0.45,
                        label="backtest band (same model, windows of as many bars)")
        ax.plot(stamps, shown["median"], color="#4a7fb0", linewidth=1, linestyle="--", label="backtest median")
    ax.plot(times, [row.nav for row in rows], color="#cf222e", linewidth=1.8, label="forward NAV")
    ax.axhline(1.0, color="#6e7781", linewidth=0.6)
    ax.set_title(title)
    ax.set_ylabel("NAV (segment start = 1)")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(segment: Segment, rows: list[BarRow], result: dict, band: pd.DataFrame, segments: list[Segment]) -> str:
    """The page's HTML. ``result`` is what ``ml.forward.monitor.monitor`` returned."""
    name, version = html.escape(segment.model_name), html.escape(segment.version)
    checks = _table(["rule", "status", "detail"], [
        [html.escape(c["rule"]), f"<b style='color:{STATUS_COLOR[c['status']]}'>{c['status']}</b>",
         html.escape(c["detail"])] for c in result["checks"]])
    drift = _table(["feature", "judged", "KS", "p-value", "train mean / std", "live mean / std"], [
        [html.escape(r["feature"]), "yes" if r["judged"] else "no", f"{r['ks']:.3f}", f"{r['p_value']:.2g}",
         f"{r['train_mean']:.4g} / {r['train_std']:.4g}", f"{r['live_mean']:.4g} / {r['live_std']:.4g}"]
        for r in result["drift"]]) if result["drift"] else "<p>Not judged yet.</p>"
    recent = _table(["bar", "version", "close", "filled at", "NAV", "held", "decision", "executed", "cost"], [
        [row.bar_time, row.version, _values(row.close), _values(row.fill_price) if row.fill_price else "",
         f"{row.nav:.6f}", _values(row.weights), _values(row.decision), _values(row.executed), f"{row.cost:.6f}"]
        for row in rows[-30:][::-1]])
    actions = "".join(f"<p>{html.escape(name.replace('_', ' '))}: " + ", ".join(
        f"{html.escape(str(key))} {value:.1%}" if "histogram" in name else f"{html.escape(str(key))} {value:.3f}"
        for key, value in values.items()) + "</p>" for name, values in result["actions"].items())
    history = _table(["segment", "version", "first decision bar", "started"], [
        [str(s.id), html.escape(s.version), s.start_bar, s.created_at] for s in segments])
    verdict = ("<p class='breach'>Monitoring breached: " + html.escape("; ".join(b["rule"] for b in result["breaches"]))
               + "</p>") if result["breaches"] else "<p class='ok'>No rule breached.</p>"
    figure = nav_figure(rows, band, f"{segment.model_name} v{segment.version}: forward test since {segment.start_bar[:10]}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Forward test: {name} v{version}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#1f2328}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}td,th{{border:1px solid #d0d7de;padding:3px 8px;font-size:13px}}
.breach{{color:#cf222e;font-weight:bold}}.ok{{color:#1a7f37;font-weight:bold}}</style></head>
<body>
<h1>Forward test: {name} v{version}</h1>
<p>Segment {segment.id}: paper trading since the decision on {segment.start_bar} (the last bar of the model's
training data), flat at NAV 1; {result['bars']} bars traded since, last bar {rows[-1].bar_time}, NAV
{rows[-1].nav:.4f}. Each decision fills at the next bar's open with the training costs{' and the risk overlay' if rows[-1].risk_state else ''}.</p>
{verdict}
<img alt="forward NAV against the backtest band" src="{figure}">
<h2>Monitoring</h2>{checks}
<h2>Live decisions</h2>{actions}
<h2>Feature drift (live bars against the training window)</h2>{drift}
<h2>Latest bars</h2>{recent}
<h2>Segments of {name}</h2>{history}
</body></html>"""


def _values(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)
