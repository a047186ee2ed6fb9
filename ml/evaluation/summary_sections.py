"""The top of the report page: does this model deserve money, and the evidence, before the fold tables.

``money_verdict`` writes the one-paragraph answer from report.json alone; the
template fragment renders the gate decision, the registered version, validation
beside test, the seed spread, stress windows, cost sensitivity, trades, the
overfitting statistics and the hyperparameter search. Absent sections (a report read before registration has
no gate yet) are left out, never invented.
"""

from __future__ import annotations

import numpy as np

# The gate's rules in the verdict's words.
RULE_NAMES = {
    "onnx_parity": "the ONNX model does not reproduce torch", "finite_test_metrics": "non-finite test metrics",
    "training_budget": "trained below the budget floor", "learned_something": "no better than random or cash on validation",
    "beats_benchmark": "no probable edge over the benchmark after costs", "low_pbo": "likely overfit selection",
    "survives_costs": "the edge does not survive higher costs", "no_collapse": "decisions collapsed to one",
    "beats_cash": "loses money after costs", "beats_champion": "not better than the champion beyond doubt",
}
VALIDATION_TEST_KEYS = ("sharpe", "total_return", "annualized_return", "max_drawdown", "annual_turnover")


def _mean(folds: list[dict], part: str, key: str) -> float:
    return float(np.mean([f["policy"][part][key] for f in folds]))


def money_verdict(report: dict) -> str:
    """One paragraph: does this model deserve money, and why (the numbers that decide it)."""
    folds, benchmark = report["folds"], report.get("benchmark", "buy_and_hold")
    label = benchmark.replace("_", "-" if benchmark == "buy_and_hold" else " ")
    policy, passive = report["aggregate"]["policy"]["sharpe"], report["aggregate"]["baselines"][benchmark]["sharpe"]
    beaten = report["aggregate"].get("folds_beating", {}).get(benchmark, {}).get("sharpe", "?")
    gate = report.get("gate")
    if gate is None:
        opening = "Pending the promotion gate."
    elif gate["passed"] and any(reason.startswith("OFF") for reason in gate["reasons"]):
        relaxed = [reason[4:].split(" rule")[0].split(" (")[0] for reason in gate["reasons"] if reason.startswith("OFF")]
        opening = (f"Not shown: its gate passed it only with {len(relaxed)} rule(s) switched off "
                   f"({', '.join(relaxed)}), so read the evidence below before trusting it.")
    elif gate["passed"]:
        opening = "Yes, by every rule of the promotion gate."
    else:
        failed = [RULE_NAMES.get(name, name.replace("_", " ")) for name, ok in gate["checks"].items() if not ok]
        opening = f"No: the promotion gate refused it ({'; '.join(failed)})."
    sentences = [opening,
                 f"Over {len(folds)} walk-forward test folds ({str(folds[0]['test']['start'])[:10]} to "
                 f"{str(folds[-1]['test']['end'])[:10]}), its mean test Sharpe after costs is {policy:.2f} against "
                 f"{label}'s {passive:.2f}, and it has the higher Sharpe in {beaten} folds."]
    active = report.get("active_return")
    if active and active.get("psr") is not None:
        sentences.append(f"The probability that its edge over {label} is real (probabilistic Sharpe of the "
                         f"active return, {active['bars']} test bars) is {active['psr']:.0%}.")
    pbo = report.get("pbo")
    if pbo:
        sentences.append(f"The probability that the selection picked an overfit checkpoint is {pbo['value']:.0%} "
                         f"({pbo['trials']} validation trials).")
    costs = report.get("cost_sensitivity", {}).get("edge_disappears_at", {})
    if benchmark in costs:
        where = costs[benchmark]
        sentences.append(f"Its edge over {label} " + ("does not survive even zero costs." if where == 0 else
                                                      f"disappears at {where:g}x costs." if where is not None else
                                                      "survives every cost multiple tried (up to 5x)."))
    risk = report.get("risk")
    if risk:
        plain = risk["without_overlay"]
        sentences.append(f"The policy and {label} both trade through the risk overlay here; without it, their mean "
                         f"test Sharpes are {plain['policy']['sharpe']:.2f} and {plain[benchmark]['sharpe']:.2f}, and "
                         f"their mean maximum drawdowns {plain['policy']['max_drawdown']:.1%} and "
                         f"{plain[benchmark]['max_drawdown']:.1%} (with it: "
                         f"{risk['with_overlay']['policy']['max_drawdown']:.1%} and "
                         f"{risk['with_overlay'][benchmark]['max_drawdown']:.1%}).")
    if report["aggregate"].get("collapse_alarm"):
        sentences.append("At least one fold collapsed to one decision.")
    return " ".join(sentences)


def validation_beside_test(report: dict) -> list[dict]:
    """Mean over folds of the policy's validation and test metrics, one row per metric."""
    folds = report["folds"]
    if not all("validation" in f["policy"] for f in folds):
        return []
    return [{"key": key, "validation": _mean(folds, "validation", key), "test": _mean(folds, "test", key)}
            for key in VALIDATION_TEST_KEYS if all(key in f["policy"]["validation"] for f in folds)]


SECTIONS = """
<p class="verdict{% if not (report.gate and report.gate.passed) %} fails{% endif %}" id="money">
 <strong>Does this model deserve money?</strong> {{ money }}</p>
{% if report.gate %}
<h2>Promotion gate: {{ "PASSED" if report.gate.passed else "FAILED" }}</h2>
<table><tr><th>rule</th><th>result</th></tr>
{% for reason in report.gate.reasons %}<tr><td>{{ reason[5:] if reason[:4] in ("PASS", "FAIL") else reason[4:] }}</td>
 <td>{{ reason.split(" ")[0] }}</td></tr>{% endfor %}</table>
{% endif %}
{% if report.model %}
<dl><dt>Registered model</dt><dd>{{ report.model.name }} version {{ report.model.version }}
 ({{ "champion" if report.model.champion else "not champion" }})</dd>
 <dt>MLflow run</dt><dd>{{ report.model.run_id }} in {{ report.model.tracking_uri }}</dd></dl>
{% endif %}
{% if side_by_side %}
<h2>Validation and test (policy, mean over folds)</h2>
<table><tr><th>metric</th><th>validation</th><th>test</th></tr>
{% for row in side_by_side %}<tr><td>{{ headers.get(row.key, row.key) }}</td><td>{{ fmt(row.validation, row.key) }}</td>
 <td>{{ fmt(row.test, row.key) }}</td></tr>{% endfor %}</table>
{% endif %}
{% if folds[0].seeds %}
<h2>Seed spread (test, never used for selection)</h2>
<table><tr><th>fold</th><th>seeds</th><th>Sharpe mean</th><th>Sharpe std</th><th>Sharpe min</th><th>Sharpe max</th></tr>
{% for fold in folds %}{% set s = fold.seeds.test_spread.sharpe %}<tr><td>{{ fold.index }}</td>
 <td>{{ fold.seeds.per_seed|length }}</td><td>{{ fmt(s.mean, "sharpe") }}</td><td>{{ fmt(s.std, "sharpe") }}</td>
 <td>{{ fmt(s.min, "sharpe") }}</td><td>{{ fmt(s.max, "sharpe") }}</td></tr>{% endfor %}</table>
{% endif %}
{% if report.stress %}
<h2>Stress windows (test segments only)</h2>
<table><tr><th>window</th><th>covered</th>{% for name in report.stress[0].strategies %}<th>{{ label(name) }} return</th>{% endfor %}
 <th>policy max drawdown</th></tr>
{% for w in report.stress %}<tr><td>{{ w.name }}</td><td>{{ when(w.covered_from) }} – {{ when(w.covered_to) }}</td>
 {% for name, m in w.strategies.items() %}<td>{{ fmt(m.total_return, "total_return") }}</td>{% endfor %}
 <td>{{ fmt(w.strategies.policy.max_drawdown, "max_drawdown") }}</td></tr>{% endfor %}</table>
{% endif %}
{% if report.cost_sensitivity %}{% set c = report.cost_sensitivity %}
<h2>Cost sensitivity (the same test decisions, mean test Sharpe)</h2>
<table><tr><th>strategy</th>{% for m in c.multiples %}<th>{{ m }} costs</th>{% endfor %}</tr>
{% for name, row in c.mean_test_sharpe.items() %}<tr><td>{{ label(name) }}</td>
 {% for m in c.multiples %}<td>{{ fmt(row[m], "sharpe") }}</td>{% endfor %}</tr>{% endfor %}</table>
<p>The edge disappears at: {% for name, m in c.edge_disappears_at.items() %}{{ label(name) }}
 {{ ("%g"|format(m) ~ "x") if m is not none else "beyond 5x" }}{% if not loop.last %}; {% endif %}{% endfor %}.</p>
{% endif %}
{% if report.risk %}{% set r = report.risk %}
<h2>Risk overlay (test, mean over folds)</h2>
<table><tr><th>strategy</th><th>overlay</th><th>Sharpe</th><th>total return</th><th>volatility</th><th>max drawdown</th>
 <th>exposure</th><th>turnover / yr</th></tr>
{% for name in r.with_overlay %}{% for side, tag in (("with_overlay", "on"), ("without_overlay", "off")) %}{% set m = r[side][name] %}
<tr><td>{{ label(name) }}</td><td>{{ tag }}</td><td>{{ fmt(m.sharpe, "sharpe") }}</td><td>{{ fmt(m.total_return, "total_return") }}</td>
 <td>{{ fmt(m.annualized_volatility, "max_drawdown") }}</td><td>{{ fmt(m.max_drawdown, "max_drawdown") }}</td>
 <td>{{ fmt(m.average_exposure, "sharpe") }}</td><td>{{ fmt(m.annual_turnover, "annual_turnover") }}</td></tr>
{% endfor %}{% endfor %}</table>
<table><tr><th>rule (policy, test)</th><th>bars acted</th><th>folds</th><th>mean exposure removed</th><th>trips</th></tr>
{% for rule, a in r.rules.items() %}{% if a.bars %}<tr><td>{{ label(rule) }}</td><td>{{ a.bars }}</td><td>{{ a.folds_acting }}</td>
 <td>{{ fmt(a.mean_exposure_removed, "sharpe") }}</td><td>{{ a.trips if a.trips is defined else "–" }}</td></tr>{% endif %}{% endfor %}</table>
<p>Every target passes through the overlay before its fill, in training, in every backtest and baseline
 (the fold tables below), and inside the exported model. "off" replays the same trained policy and the benchmark
 with nothing between target and fill. A negative exposure removed means volatility targeting added exposure.</p>
{% endif %}
{% if folds[0].trades %}
<h2>Trades (test)</h2>
<table><tr><th>fold</th><th>trades</th><th>win rate</th><th>average win</th><th>average loss</th><th>holding bars</th>
 <th>exposure</th><th>turnover / yr</th><th>beta</th></tr>
{% for fold in folds %}{% set t = fold.trades or {} %}<tr><td>{{ fold.index }}</td><td>{{ t.count }}</td>
 <td>{{ fmt(t.win_rate, "costs_paid") }}</td><td>{{ fmt(t.average_win, "total_return") }}</td>
 <td>{{ fmt(t.average_loss, "total_return") }}</td><td>{{ fmt(t.average_holding_bars, "sharpe") }}</td>
 <td>{{ fmt(fold.policy.test.average_exposure, "sharpe") }}</td><td>{{ fmt(fold.policy.test.annual_turnover, "annual_turnover") }}</td>
 <td>{{ fmt((fold.beta_alpha or {}).beta, "sharpe") }}</td></tr>{% endfor %}</table>
{% endif %}
{% if report.pbo is defined or report.spa %}
<h2>Overfitting and multiple comparisons</h2>
<dl>
 <dt>PBO</dt><dd>{% if report.pbo %}{{ fmt(report.pbo.value, "costs_paid") }} over {{ report.pbo.trials }} validation trials
  in {{ report.pbo.folds }} folds{% else %}– (fewer than two trials){% endif %}</dd>
 {% if report.spa %}<dt>SPA p-value</dt><dd>{{ "%.3f"|format(report.spa.p_value) }} (small: some baseline beats the
  policy after accounting for the {{ report.spa.models|length }} baselines tried)</dd>{% endif %}
</dl>
{% endif %}
{% if report.tuning %}{% set t = report.tuning %}
<h2>Hyperparameter search</h2>
<dl>
 <dt>Study</dt><dd>{{ t.study }}: {{ t.trials_completed }} completed, {{ t.trials_pruned }} pruned,
  {{ t.trials_failed }} failed trials (validation folds only; the test windows were not read)</dd>
 <dt>Best trial</dt><dd>{{ t.best_trial }}, mean validation score {{ fmt(t.best_validation_score, "sharpe") }}</dd>
 {% if t.selection_allowance is not none %}<dt>Best of {{ t.trials_completed }} by luck alone</dt><dd>{{ fmt(t.selection_allowance, "sharpe") }}
  (inflation of the best score: {{ fmt(t.inflation, "sharpe") }})</dd>{% endif %}
</dl>
<p>Every trial's validation score counts in the deflated Sharpe ratio and its validation returns in the PBO.</p>
{% endif %}
"""
