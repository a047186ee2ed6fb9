"""One self-contained HTML page of a walk-forward report: tables, verdicts, embedded figures.

The page reads the dict written to report.json, so it shows exactly what
the pipeline measured. Figures are embedded as base64 data URIs: the file
can be mailed or attached to an MLflow run and still open anywhere.

Verdicts compare raw numbers, never rounded ones, and a tie is not a win.
When two different values would print the same, more decimals are shown.
"""

from __future__ import annotations

import base64
import math
import mimetypes
from datetime import datetime
from pathlib import Path

import jinja2

from ml.evaluation.summary_sections import SECTIONS, money_verdict, validation_beside_test

# What a policy must beat to be worth running (equal weight stands for buy-and-hold in portfolio mode).
BASELINES_IN_VERDICT = ("buy_and_hold", "equal_weight", "cash")
UNCERTAINTY_KEYS = ("sharpe_ci_low", "sharpe_ci_high", "psr", "dsr")
AGGREGATE_KEYS = ("total_return", "annualized_return", "sharpe", "max_drawdown", "annual_turnover", "costs_paid")
PERCENT_KEYS = {"total_return", "annualized_return", "max_drawdown", "costs_paid"}
SIGNED_KEYS = {"total_return", "annualized_return"}  # a gain or a loss; drawdowns and costs have one sign
HEADERS = {
    "total_return": "total return", "annualized_return": "ann. return", "sharpe": "Sharpe",
    "max_drawdown": "max drawdown", "annual_turnover": "turnover / yr", "costs_paid": "costs",
}


# Formatting ---------------------------------------------------------------------------------

def _number(value) -> float | None:
    if isinstance(value, jinja2.Undefined):  # a metric this report does not carry
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _format(value, key: str, decimals: int = 2) -> str:
    value = _number(value)
    if value is None:
        return "–"
    if key in SIGNED_KEYS:
        return f"{value:+.{decimals}%}"
    if key in PERCENT_KEYS:
        return f"{value:.{decimals}%}"
    if key == "annual_turnover":
        return f"{value:.{decimals}f}×"
    if key in ("psr", "dsr"):
        # Probabilities are cut, not rounded: 94.96% must not print as 95%.
        return f"{math.floor(value * 1000 + 1e-9) / 10:.1f}%"
    return f"{value:.{decimals}f}"


def _pair(policy: float, baseline: float, key: str) -> tuple[str, str]:
    """Both values formatted, with enough decimals that different values never print alike."""
    for decimals in range(2, 7):
        shown = _format(policy, key, decimals), _format(baseline, key, decimals)
        if shown[0] != shown[1] or policy == baseline:
            return shown
    return shown


def _when(stamp) -> str:
    """An ISO timestamp as a date, with the time of day only for intraday bars."""
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp or "")
    if (moment.hour, moment.minute, moment.second) == (0, 0, 0):
        return moment.strftime("%Y-%m-%d")
    offset = moment.utcoffset()
    zone = "" if offset is None else (" UTC" if not offset else moment.strftime(" %z"))
    return moment.strftime("%Y-%m-%d %H:%M") + zone


def _interval(metrics: dict) -> str:
    if "sharpe_ci_low" not in metrics:
        return "–"
    return f"[{_format(metrics['sharpe_ci_low'], 'sharpe')}, {_format(metrics.get('sharpe_ci_high'), 'sharpe')}]"


def _label(name: str) -> str:
    return name.replace("_", "-") if name == "buy_and_hold" else name.replace("_", " ")


# Verdicts -----------------------------------------------------------------------------------

def _word(policy: float, baseline: float) -> str:
    return "higher" if policy > baseline else ("equal" if policy == baseline else "lower")


def _against(policy: dict, baseline: dict, name: str) -> str:
    label = _label(name)
    sharpe = _pair(policy["sharpe"], baseline["sharpe"], "sharpe")
    returns = _pair(policy["total_return"], baseline["total_return"], "total_return")
    wins_sharpe = policy["sharpe"] > baseline["sharpe"]
    wins_return = policy["total_return"] > baseline["total_return"]
    if wins_sharpe and wins_return:
        text = (f"The policy beats {label} on both Sharpe ({sharpe[0]} vs {sharpe[1]}) "
                f"and total return ({returns[0]} vs {returns[1]}).")
    elif not wins_sharpe and not wins_return:
        text = (f"The policy does NOT beat {label}: Sharpe {sharpe[0]} vs {sharpe[1]}, "
                f"total return {returns[0]} vs {returns[1]}.")
    else:
        text = (f"The policy does NOT clearly beat {label}: "
                f"{_word(policy['sharpe'], baseline['sharpe'])} Sharpe ({sharpe[0]} vs {sharpe[1]}) but "
                f"{_word(policy['total_return'], baseline['total_return'])} total return "
                f"({returns[0]} vs {returns[1]}).")
    low, high = _number(policy.get("sharpe_ci_low")), _number(policy.get("sharpe_ci_high"))
    if wins_sharpe and low is not None and high is not None and low <= baseline["sharpe"] <= high:
        # A higher point estimate inside the policy's own interval is not an established edge.
        text += (f" {label.capitalize()}'s Sharpe lies inside the policy's interval "
                 f"[{low:.2f}, {high:.2f}], so the Sharpe edge is not established.")
    return text


def fold_verdict(fold: dict) -> str:
    """Plain-language verdict of one fold's test window against buy-and-hold and cash."""
    policy = fold["policy"]["test"]
    sentences = [_against(policy, fold["baselines"][name], name)
                 for name in BASELINES_IN_VERDICT if name in fold["baselines"]]
    psr = _number(policy.get("psr"))
    if psr is not None:
        judged = ("at or above the usual 95% bar" if psr >= 0.95
                  else "below the usual 95% bar, so a positive Sharpe is not established")
        sentences.append(f"Probability that the policy's true Sharpe exceeds 0 (PSR): "
                         f"{_format(psr, 'psr')}, {judged}.")
    collapse = fold["policy"].get("collapse") or {}
    if collapse.get("alarm"):
        chose = (f"weights {collapse['dominant_weights']}" if "dominant_weights" in collapse
                 else f"exposure {collapse['dominant_exposure']:+.2f}")
        sentences.append(f"Collapse alarm: the policy chose {chose} on {collapse['dominant_share']:.0%} of test bars.")
    return " ".join(sentences)


def aggregate_verdict(report: dict) -> str:
    """Mean test Sharpe across folds against buy-and-hold and cash, with the fold count beaten."""
    aggregate = report["aggregate"]
    sentences = []
    for name in BASELINES_IN_VERDICT:
        if name not in aggregate["baselines"]:
            continue
        policy, baseline = aggregate["policy"]["sharpe"], aggregate["baselines"][name]["sharpe"]
        shown = _pair(policy, baseline, "sharpe")
        verb = "beats" if policy > baseline else "does NOT beat"
        beaten = aggregate.get("folds_beating", {}).get(name, {}).get("sharpe", "?")
        sentences.append(f"On mean test Sharpe the policy {verb} {_label(name)} ({shown[0]} vs {shown[1]}); "
                         f"it has the higher Sharpe in {beaten} folds.")
    if aggregate.get("collapse_alarm"):
        sentences.append("At least one fold raised the collapse alarm.")
    return " ".join(sentences)


# Page ---------------------------------------------------------------------------------------

def _rows(fold: dict) -> list[dict]:
    rows = [{"name": "policy", "metrics": fold["policy"]["test"], "policy": True}]
    rows += [{"name": name, "metrics": values, "policy": False} for name, values in fold["baselines"].items()]
    return rows


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Walk-forward report: {{ report.symbol }} {{ report.interval }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
 table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
 th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 tr.policy { background: #fdecea; font-weight: 600; }
 .verdict { padding: 0.6em 0.9em; border-left: 4px solid #1f77b4; background: #f4f8fb; }
 .verdict.fails { border-left-color: #d62728; background: #fdf1f1; }
 dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
 dt { font-weight: 600; } dd { margin: 0; font-family: monospace; }
 figure { margin: 1em 0; } img { max-width: 100%; }
</style></head><body>
<h1>Walk-forward report: {{ report.symbol }} ({{ report.interval }})</h1>
""" + SECTIONS + """
<h2>Data and settings</h2>
<dl>
 <dt>Symbol</dt><dd>{{ report.symbol }}</dd>
 <dt>Interval</dt><dd>{{ report.interval }}</dd>
 <dt>Source</dt><dd>{{ report.source or "–" }}, {{ report.rows or "?" }} rows</dd>
 <dt>Dataset hash</dt><dd>{{ report.dataset_hash }}</dd>
 <dt>Test span</dt><dd>{{ when(folds[0].test.start) }} – {{ when(folds[-1].test.end) }}</dd>
 <dt>Selection metric</dt><dd>{{ report.selection_metric or "–" }} (validation only)</dd>
 {% if report.costs %}
 <dt>Costs</dt><dd>{% for k, v in report.costs.items() %}{{ k }}={{ v }} {% endfor %}</dd>
 {% endif %}
</dl>

<h2>Folds</h2>
{% if report.risk %}<p>The policy and every baseline below trade through the risk overlay (see "Risk overlay").</p>{% endif %}
<table id="folds">
 <tr><th>fold</th><th>train</th><th>validation</th><th>test</th><th>policy Sharpe</th>
  {% for name in verdict_baselines %}<th>{{ label(name) }} Sharpe</th>{% endfor %}
  <th>policy Sharpe higher than</th></tr>
 {% for fold in folds %}
 <tr class="fold-row" data-fold="{{ fold.index }}"><td>{{ fold.index }}</td>
  {% for part in ("train", "validation", "test") %}
  <td>{{ when(fold[part].start) }} – {{ when(fold[part].end) }}</td>
  {% endfor %}
  <td>{{ fmt(fold.policy.test.sharpe, "sharpe") }}</td>
  {% for name in verdict_baselines %}<td>{{ fmt(fold.baselines[name].sharpe, "sharpe") }}</td>{% endfor %}
  <td>{{ beats[loop.index0] }}</td></tr>
 {% endfor %}
</table>

{% for fold in folds %}
<h3>Fold {{ fold.index }}: test {{ when(fold.test.start) }} – {{ when(fold.test.end) }}</h3>
<table class="fold-detail" data-fold="{{ fold.index }}">
 <tr><th>strategy</th><th>total return</th><th>Sharpe</th>
  {% if uncertainty.interval %}<th>Sharpe 95% interval</th>{% endif %}
  {% if uncertainty.psr %}<th>PSR</th>{% endif %}{% if uncertainty.dsr %}<th>DSR</th>{% endif %}
  <th>max drawdown</th><th>turnover / yr</th><th>costs</th></tr>
 {% for row in rows(fold) %}{% set m = row.metrics %}
 <tr{% if row.policy %} class="policy"{% endif %}><td>{{ label(row.name) }}</td>
  <td>{{ fmt(m.total_return, "total_return") }}</td><td>{{ fmt(m.sharpe, "sharpe") }}</td>
  {% if uncertainty.interval %}<td>{{ interval(m) }}</td>{% endif %}
  {% if uncertainty.psr %}<td>{{ fmt(m.psr, "psr") }}</td>{% endif %}
  {% if uncertainty.dsr %}<td>{{ fmt(m.dsr, "dsr") }}</td>{% endif %}
  <td>{{ fmt(m.max_drawdown, "max_drawdown") }}</td><td>{{ fmt(m.annual_turnover, "annual_turnover") }}</td>
  <td>{{ fmt(m.costs_paid, "costs_paid") }}</td></tr>
 {% endfor %}
</table>
{% set verdict = verdicts[loop.index0] %}
<p class="verdict{% if 'NOT' in verdict %} fails{% endif %}" data-fold="{{ fold.index }}">{{ verdict }}</p>
{% endfor %}

<h2>Aggregate (mean over {{ folds|length }} test folds)</h2>
<table id="aggregate">
 <tr><th>strategy</th>{% for key in aggregate_keys %}<th>{{ headers[key] }}</th>{% endfor %}
  <th>folds policy has higher Sharpe</th></tr>
 <tr class="policy"><td>policy</td>
  {% for key in aggregate_keys %}<td>{{ fmt(report.aggregate.policy[key], key) }}</td>{% endfor %}<td>–</td></tr>
 {% for name, values in report.aggregate.baselines.items() %}
 <tr><td>{{ label(name) }}</td>{% for key in aggregate_keys %}<td>{{ fmt(values[key], key) }}</td>{% endfor %}
  <td>{{ report.aggregate.folds_beating.get(name, {}).get("sharpe", "–") }}</td></tr>
 {% endfor %}
</table>
<p class="verdict{% if 'NOT' in overall or report.aggregate.collapse_alarm %} fails{% endif %}" id="overall">
{{ overall }}</p>

{% if report.cpcv %}{% set cpcv = report.cpcv %}
<h2>Combinatorial purged cross-validation</h2>
<p>{{ cpcv.n_splits }} splits ({{ cpcv.n_test_groups }} of {{ cpcv.n_groups }} groups tested, one policy each,
 selected on the latest untested group) recombine into {{ cpcv.n_paths }} backtest paths over the whole history.
 The policy's path Sharpe beats {{ label(cpcv.benchmark) }}'s ({{ fmt(cpcv.paths[0].benchmark.sharpe, "sharpe") }})
 on {{ cpcv.paths_beating_benchmark }} paths. Probability of backtest overfitting:
 {% if cpcv.pbo %}{{ "%.0f%%"|format(cpcv.pbo.value * 100) }} (mean over {{ cpcv.pbo.splits }} splits,
 {{ cpcv.pbo.trials }} checkpoints x seeds){% else %}– (fewer than two trials){% endif %}.</p>
<table id="cpcv-paths">
 <tr><th>path</th><th>splits (group by group)</th><th>policy Sharpe</th><th>policy total return</th>
  <th>policy max drawdown</th><th>{{ label(cpcv.benchmark) }} Sharpe</th></tr>
 {% for path in cpcv.paths %}
 <tr><td>{{ path.index }}</td><td>{{ path.splits|join(", ") }}</td><td>{{ fmt(path.policy.sharpe, "sharpe") }}</td>
  <td>{{ fmt(path.policy.total_return, "total_return") }}</td>
  <td>{{ fmt(path.policy.max_drawdown, "max_drawdown") }}</td><td>{{ fmt(path.benchmark.sharpe, "sharpe") }}</td></tr>
 {% endfor %}
 {% set spread = cpcv.path_sharpe.policy %}
 <tr class="policy"><td>Sharpe over paths</td><td>mean {{ fmt(spread.mean, "sharpe") }}, std
  {{ fmt(spread.std, "sharpe") }}</td><td>median {{ fmt(spread.median, "sharpe") }}</td>
  <td>min {{ fmt(spread.min, "sharpe") }}</td><td>max {{ fmt(spread.max, "sharpe") }}</td><td></td></tr>
</table>
{% endif %}

{% if images %}<h2>Figures</h2>{% endif %}
{% for caption, uri in images %}
<figure><img src="{{ uri }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
</body></html>
"""


def render_html_report(path: Path, report: dict, images: dict[str, Path]) -> Path:
    """Write the page to ``path`` from a report.json dict; ``images`` maps captions to PNG files."""
    folds = report["folds"]
    if not folds:
        raise ValueError("the report has no folds")
    present = {key for fold in folds for row in _rows(fold) for key in UNCERTAINTY_KEYS
               if key in row["metrics"]}
    verdict_baselines = [name for name in BASELINES_IN_VERDICT if all(name in f["baselines"] for f in folds)]
    beats = [", ".join(_label(name) for name in verdict_baselines
                       if f["policy"]["test"]["sharpe"] > f["baselines"][name]["sharpe"]) or "none"
             for f in folds]
    # Lenient on missing optional fields (source, costs): they print as blanks, not errors.
    environment = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    page = environment.from_string(_TEMPLATE).render(
        report=report, folds=folds, rows=_rows, fmt=_format, when=_when, label=_label, interval=_interval,
        verdicts=[fold_verdict(f) for f in folds], overall=aggregate_verdict(report), beats=beats,
        verdict_baselines=verdict_baselines, aggregate_keys=AGGREGATE_KEYS, headers=HEADERS,
        uncertainty={"interval": "sharpe_ci_low" in present, "psr": "psr" in present, "dsr": "dsr" in present},
        images=[(caption, _data_uri(path)) for caption, path in images.items()],
        money=money_verdict(report), side_by_side=validation_beside_test(report),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
