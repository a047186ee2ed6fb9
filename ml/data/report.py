"""A self-contained HTML page for a quarantined batch's validation result.

Real GX Data Docs are a site (index, per-run pages, shared CSS/JS under
``static/``) built into a local folder by a file context from stored
validation results; a single page of it is not portable and cannot be put
beside ``validation.json`` on S3. This page is one file with inline CSS and no
scripts, rendered from the same record as ``validation.json``, so it opens
offline, from a bucket or from an e-mail attachment alike.
"""

from __future__ import annotations

from html import escape

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#222}
h1{font-size:1.3rem}table{border-collapse:collapse;margin:.5rem 0 1.5rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.fail{color:#b00020;font-weight:600}.pass{color:#1b7f3b}
tr.failed{background:#fff4f4}table.examples{margin:0;font-size:12px}code{font-size:12px}
"""


def _cell(value) -> str:
    return escape("" if value is None else str(value))


def _examples_table(examples: list[dict]) -> str:
    if not examples:
        return ""
    columns = list(dict.fromkeys(key for row in examples for key in row))
    head = "".join(f"<th>{_cell(c)}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>"
                   for row in examples)
    return f'<table class="examples"><tr>{head}</tr>{rows}</table>'


def render_validation_html(report: dict) -> str:
    """HTML for a quarantine record (the dict written as ``validation.json``).

    Lists every rule of the suite, failed ones first, with pass/fail, the
    number of unexpected rows and the example rows the gate kept.
    """
    validation = report.get("validation", {})
    rules = sorted(validation.get("rules", []), key=lambda rule: bool(rule.get("success")))
    failed = [rule for rule in rules if not rule.get("success")]
    facts = [("origin", validation.get("origin")), ("suite", validation.get("suite")),
             ("pull id", report.get("pull_id")), ("quarantined at", report.get("quarantined_at")),
             ("rows in the batch", report.get("batch_rows")), ("rows checked (merged series)", report.get("checked_rows")),
             ("curated version kept", report.get("curated_hash") or "none (nothing curated yet)")]
    fact_rows = "".join(f"<tr><th>{_cell(k)}</th><td><code>{_cell(v)}</code></td></tr>" for k, v in facts)
    rule_rows = []
    for rule in rules:
        ok = bool(rule.get("success"))
        status = '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'
        rule_rows.append(
            f'<tr class="{"passed" if ok else "failed"}"><td>{_cell(rule.get("rule"))}</td><td>{status}</td>'
            f'<td>{_cell(rule.get("unexpected_count", 0))}</td>'
            f'<td>{_examples_table(rule.get("examples") or [])}</td></tr>')
    title = f"Quarantined batch: {len(failed)} of {len(rules)} rules failed"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_cell(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_cell(title)}</h1><table>{fact_rows}</table>"
        "<table><tr><th>rule</th><th>result</th><th>unexpected rows</th><th>examples</th></tr>"
        f"{''.join(rule_rows)}</table>"
        "<p>Curated data was not changed. Fix the source or the rule, then pull again; "
        "the batch itself is in <code>bars.parquet</code> beside this page.</p>"
        "</body></html>\n"
    )
