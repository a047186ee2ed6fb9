"""Promotions racing from hosts that share no file system: two processes with their own temp
directories (where the promotion file lock lives for a remote store) against one real
`mlflow server` on loopback. Only the registry-level lease and the champion re-check keep them apart.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from ml.release import registry
from ml.release.lock import LEASE_TAG
from ml.release.tracking import start_run, store_client
from tests.mlflow_server import MlflowServer

MODEL = "ppo_RACE_1d"
FAILS = {"3"}  # the version whose gate fails


def _racer(uri: str, versions: list[str], start, out: str) -> None:
    """One worker's register step for each of its versions: judge against the champion, then move it."""
    start.wait()
    judged = []

    def judge(champion: str | None) -> dict:
        judged.append({"version": version, "champion": champion, "at": time.time()})
        time.sleep(0.3)  # the champion comparison takes a while
        passed = version not in FAILS
        return {"decision": {"passed": passed, "reasons": [f"against v{champion}"], "checks": {}, "numbers": {}},
                "description": f"judged against v{champion}"}

    results = []
    for version in versions:
        answer = registry.judge_and_promote(uri, MODEL, version, judge, promote=True)
        results.append({"version": version, "champion_before": answer["champion_before"],
                        "promoted": answer["promoted"], "judged_at": judged[-1]["at"]})
    Path(out).write_text(json.dumps({"tempdir": tempfile.gettempdir(), "results": results, "judged": judged}))


def test_racing_hosts_never_crown_a_failed_or_stale_decision(tmp_path, monkeypatch):
    with MlflowServer(tmp_path) as server:
        client = store_client(server.url)
        client.create_registered_model(MODEL)
        for _ in range(4):
            run_id = start_run(server.url, "", "race", "run", {}, {})
            client.log_text(run_id, "weights would be here", "model/README.txt")
            client.create_model_version(MODEL, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)

        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(2)
        racers = []
        for name, versions in (("a", ["1", "3"]), ("b", ["2", "4"])):
            (tmp_path / f"tmp-{name}").mkdir()
            monkeypatch.setenv("TMPDIR", str(tmp_path / f"tmp-{name}"))  # read by the child at its start
            racer = ctx.Process(target=_racer, args=(server.url, versions, start, str(tmp_path / f"{name}.json")))
            racer.start()
            racers.append(racer)
        for racer in racers:
            racer.join(120)
        assert [r.exitcode for r in racers] == [0, 0]
        reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in "ab"]
        assert reports[0]["tempdir"] != reports[1]["tempdir"]  # no shared file lock

        # In the order they were (finally) judged, each saw the champion its predecessor left.
        results = sorted((r for report in reports for r in report["results"]), key=lambda r: r["judged_at"])
        champion = None
        for result in results:
            assert result["champion_before"] == champion, results
            assert result["promoted"] == (result["version"] not in FAILS)
            if result["promoted"]:
                champion = result["version"]
        assert registry.alias_version(server.url, MODEL, registry.CHAMPION) == champion not in FAILS
        assert LEASE_TAG not in client.get_registered_model(MODEL).tags  # released
        for version in client.search_model_versions(f"name = '{MODEL}'"):
            assert version.tags["gate.passed"] == str(version.version not in FAILS).lower()
