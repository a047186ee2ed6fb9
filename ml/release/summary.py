"""Human-readable summary of what the registry holds for a model, read from MLflow itself."""

from __future__ import annotations

import os

from ml.release.registry import CHALLENGER, CHAMPION, alias_version
from ml.release.tracking import store_client


def registry_summary(model_name: str, tracking_uri: str | None = None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = store_client(uri)
    versions = client.search_model_versions(f"name = '{model_name}'")
    if not versions:
        return f"model '{model_name}': no registered versions in {uri}"
    latest = max(versions, key=lambda v: int(v.version))
    latest_version = str(latest.version)
    champion = alias_version(uri, model_name, CHAMPION)
    challenger = alias_version(uri, model_name, CHALLENGER)
    run = client.get_run(latest.run_id)
    metrics = run.data.metrics
    passed = latest.tags.get("gate.passed") == "true"
    became = "yes" if champion == latest_version else "no"
    policy_sharpe = metrics.get("test/mean/policy/sharpe", float("nan"))
    # A portfolio run is measured against equal weight, a single asset against buy-and-hold.
    benchmark = "equal_weight" if "test/mean/equal_weight/sharpe" in metrics else "buy_and_hold"
    label = benchmark.replace("_", " ") if benchmark == "equal_weight" else "buy-and-hold"
    hold_sharpe = metrics.get(f"test/mean/{benchmark}/sharpe", float("nan"))
    beats = policy_sharpe > hold_sharpe
    lines = [
        f"Registered model : {model_name}, version {latest_version} (of {len(versions)})",
        f"Aliases          : champion -> v{champion or '-'}, challenger -> v{challenger or '-'}",
        f"Became champion  : {became}; gate {'passed' if passed else 'FAILED'}: {latest.tags.get('gate.reasons', '')}",
        "Out-of-sample (walk-forward test folds, mean):",
        f"  {'':14s}{'total return':>14s}{'ann. return':>13s}{'Sharpe':>8s}{'max DD':>9s}",
    ]
    rows = [("policy", "test/mean/policy/"), (label, f"test/mean/{benchmark}/")]
    if "risk/without_overlay/policy/sharpe" in metrics:  # the same folds with nothing between target and fill
        lines[-2] = "Out-of-sample (walk-forward test folds, mean; traded through the risk overlay):"
        rows += [("policy, no overlay", "risk/without_overlay/policy/"),
                 (f"{label}, no overlay"[:24], f"risk/without_overlay/{benchmark}/")]
    width = max(len(name) for name, _ in rows) + 2
    lines[-1] = f"  {'':{width}s}{'total return':>14s}{'ann. return':>13s}{'Sharpe':>8s}{'max DD':>9s}"
    for name, prefix in rows:
        lines.append(
            f"  {name:{width}s}{metrics.get(prefix + 'total_return', float('nan')):>+14.2%}"
            f"{metrics.get(prefix + 'annualized_return', float('nan')):>+13.2%}"
            f"{metrics.get(prefix + 'sharpe', float('nan')):>8.2f}"
            f"{metrics.get(prefix + 'max_drawdown', float('nan')):>+9.2%}"
        )
    lines.append(
        f"Verdict          : the policy {'beats' if beats else 'does NOT beat'} {label} on mean test "
        f"Sharpe ({policy_sharpe:.2f} vs {hold_sharpe:.2f})"
    )
    lines += [
        f"MLflow run       : {latest.run_id} in {uri}",
        f"Model URI        : models:/{model_name}@champion",
    ]
    return "\n".join(lines)
