"""The Airflow UI as the README starts it: `source scripts/env.sh && airflow standalone`, on loopback.

One `airflow standalone` serves every test here. It is started from a shell whose PATH lacks the
project's venv, as on a fresh clone, with its own AIRFLOW_HOME, port and MLflow store, a tiny
training config ($ML_TRAINING_CONFIG), and a DAG folder that holds the project's DAG files plus one
probe DAG that registers a real MLflow version and pushes its links the way register does.

Checked: the API server listens on 127.0.0.1 only and lists the DAGs, paused, until the README's
unpause command; model_promotion refuses a run without an action; a task's MLflow links come back
from the API server and open the MLflow run, the model version and report.html on a real MLflow
server. In Chromium: the trigger form of ppo_training refuses an out-of-range value; then, as a new
user, a tiny GSPC training typed into that form (unpausing the DAG on trigger) succeeds with the
typed values as its conf and its MLflow params, and the register task's "MLflow run" and
"report.html" buttons open, on `mlflow ui`, that training's MLflow run and the pipeline's report.

Everything the fixture starts is stopped at the end (tests.airflow_services.Cluster). Bounds can be
raised on a slow machine with AIRFLOW_E2E_STARTUP_TIMEOUT, AIRFLOW_E2E_RUN_TIMEOUT and
AIRFLOW_E2E_BUDGET (seconds; the budget caps all the module's waits together).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import pytest
import requests

from tests.airflow_services import Api, Cluster, wait_for_http, wait_until
from tests.conftest import ROOT
from tests.servers import free_port

pytestmark = pytest.mark.slow

README_COMMAND = "source scripts/env.sh && airflow standalone"
UNPAUSE_COMMAND = "source scripts/env.sh && airflow dags unpause {dag_id}"
PROJECT_DAGS = ("ppo_training", "market_data", "model_promotion")
PROBE_DAG = "mlflow_links_probe"
STARTUP_TIMEOUT = float(os.environ.get("AIRFLOW_E2E_STARTUP_TIMEOUT", 240))
BUDGET = float(os.environ.get("AIRFLOW_E2E_BUDGET", 1500))
CHROMIUM = "/usr/bin/chromium"
# The deployment's training config ($ML_TRAINING_CONFIG): unpausing ppo_training starts its newest
# nightly run at once, with no Params, and that run must be as small as the one the form triggers.
# Its settings differ from the form's, so the form's run is not skipped as unchanged.
TINY_TRAINING_CONFIG = """\
data: {start: "2009-01-01"}
ppo: {total_timesteps: 1024, num_envs: 16, num_steps: 16, eval_every: 1, progress: false}
splits: {n_folds: 1, test_months: 6, validation_months: 6, min_train_bars: 300}
gate: {parity_windows: 64}
"""

# Does what the register task of ppo_training does for its buttons, without the training: a real
# MLflow run with report/report.html, a registered version of it, then push_mlflow_links.
PROBE_DAG_CODE = '''
import pendulum
from airflow.sdk import dag, task


@dag(dag_id="mlflow_links_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def mlflow_links_probe():
    @task
    def register_report() -> dict:
        import os
        import tempfile
        from pathlib import Path

        from mlflow_link import push_mlflow_links

        from ml.release.tracking import resolve_tracking, start_run, store_client

        uri = os.environ["MLFLOW_TRACKING_URI"]
        _, artifact_root = resolve_tracking(uri, None, Path("."))
        run_id = start_run(uri, artifact_root, "links-probe", "mlflow_links_probe/1", params={}, tags={})
        client = store_client(uri)
        with tempfile.TemporaryDirectory() as folder:
            report = Path(folder) / "report.html"
            report.write_text("<html><body><h1>probe report 7f3a</h1></body></html>")
            client.log_artifact(run_id, str(report), artifact_path="report")
        client.create_registered_model("ppo_PROBE_1d")
        version = client.create_model_version("ppo_PROBE_1d", source=client.get_run(run_id).info.artifact_uri,
                                              run_id=run_id)
        return push_mlflow_links({"tracking_uri": uri, "run_id": run_id, "model_name": "ppo_PROBE_1d",
                                  "version": version.version})

    @task
    def no_links() -> None:
        pass

    register_report() >> no_links()


mlflow_links_probe()
'''


def fresh_clone_path() -> str:
    """PATH of a new shell: the venv is not activated, so `airflow` is not on it."""
    venv_bin = Path(sys.executable).parent.resolve()
    return os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep)
                           if part and Path(part).resolve() != venv_bin)


def shell(cluster: Cluster, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], env=cluster.env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    home, dags, mlflow_dir = tmp / "airflow", tmp / "dags", tmp / "mlflow"
    for folder in (home, dags, mlflow_dir):
        folder.mkdir()
    for name in PROJECT_DAGS:
        (dags / f"{name}.py").symlink_to(ROOT / "dags" / f"{name}.py")
    (dags / f"{PROBE_DAG}.py").write_text(PROBE_DAG_CODE)
    training_config = home / "ml-configs" / "tiny.yaml"  # $AIRFLOW_HOME/ml-configs: a default config root
    training_config.parent.mkdir()
    training_config.write_text(TINY_TRAINING_CONFIG)
    port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "ML_"))}
    env.update({
        "PATH": fresh_clone_path(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__API__PORT": str(port),
        # Free ports for the log servers too, so that a UI already running on this machine is no obstacle.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}",
        "ML_RUNS_DIR": str(tmp / "runs"),
        "ML_TRAINING_CONFIG": str(training_config),
    })
    assert shutil.which("airflow", path=env["PATH"]) is None, "the test shell must not find airflow before env.sh"
    cluster = Cluster(home, env, budget=BUDGET)
    log = open(cluster.logs / "standalone.log", "wb")  # noqa: SIM115 - closed by cluster.stop()
    cluster._files.append(log)
    try:
        cluster.procs["standalone"] = subprocess.Popen(
            ["bash", "-c", README_COMMAND], env=cluster.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base_url}/api/v2/monitor/health", cluster.left(STARTUP_TIMEOUT), "api-server health",
                      proc=cluster.procs["standalone"], on_timeout=cluster.report)
        # The admin password, where the README says it is.
        passwords = home / "simple_auth_manager_passwords.json.generated"
        password = wait_until(lambda: json.loads(passwords.read_text()).get("admin"), cluster.left(60),
                              f"the admin password in {passwords}")
        api = Api(base_url)
        api.login("admin", password)

        def all_listed():
            cluster.assert_running()
            errors = api.ok_json("GET", "/api/v2/importErrors")["import_errors"]
            assert not errors, f"DAG import errors: {errors}"
            listed = {d["dag_id"] for d in api.ok_json("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
            return listed >= {*PROJECT_DAGS, PROBE_DAG}

        wait_until(all_listed, cluster.left(STARTUP_TIMEOUT), "the DAGs to be listed", interval=2,
                   on_timeout=cluster.report)
        yield {"cluster": cluster, "api": api, "port": port, "password": password, "mlflow_dir": mlflow_dir,
               "mlflow_port": mlflow_port, "base_url": base_url}
    finally:
        cluster.stop()
        assert not cluster.marked_processes(), "processes survived the cluster's teardown"


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs
            if addr.family == socket.AF_INET and not addr.address.startswith("127.")]


def test_the_readme_ui_command_answers_on_loopback_only_and_lists_the_dags_paused(ui):
    readme = (ROOT / "README.md").read_text()
    assert README_COMMAND in readme and UNPAUSE_COMMAND.format(dag_id="ppo_training") in readme
    api, port = ui["api"], ui["port"]

    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening
    for address in other_addresses():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(3)
            assert probe.connect_ex((address, port)) != 0, f"the UI answers on {address}:{port}"

    dags = {d["dag_id"]: d for d in api.ok_json("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
    assert all(dags[dag_id]["is_paused"] for dag_id in PROJECT_DAGS), {d: dags[d]["is_paused"] for d in PROJECT_DAGS}
    # The schedule shows in the DAG list: the cron of the nightly market data pull.
    assert "30 21 * * 1-5" in dags["market_data"]["timetable_summary"], dags["market_data"]["timetable_summary"]
    assert "21:30 UTC" in dags["market_data"]["description"], dags["market_data"]["description"]

    shell(ui["cluster"], UNPAUSE_COMMAND.format(dag_id="model_promotion"))
    assert api.ok_json("GET", "/api/v2/dags/model_promotion")["is_paused"] is False


def test_model_promotion_refuses_a_run_without_an_action(ui):
    api = ui["api"]
    for conf in ({}, {"action": "demote"}):
        resp = api.request("POST", "/api/v2/dags/model_promotion/dagRuns", json={"logical_date": None, "conf": conf})
        assert resp.status_code == 400, f"{conf}: {resp.status_code} {resp.text[:500]}"
        assert "action" in resp.text, resp.text[:500]
    assert api.ok_json("GET", "/api/v2/dags/model_promotion/dagRuns")["total_entries"] == 0


def test_task_links_open_the_mlflow_run_version_and_report(ui, tmp_path):
    cluster, api = ui["cluster"], ui["api"]
    shell(cluster, UNPAUSE_COMMAND.format(dag_id=PROBE_DAG))
    run = api.ok_json("POST", f"/api/v2/dags/{PROBE_DAG}/dagRuns", json={"logical_date": None, "conf": {}})
    run_id = run["dag_run_id"]

    def finished():
        cluster.assert_running()
        state = api.ok_json("GET", f"/api/v2/dags/{PROBE_DAG}/dagRuns/{run_id}")["state"]
        assert state != "failed", f"probe run failed\n{cluster.report()}"
        return state == "success"

    wait_until(finished, cluster.left(240), "the probe run to succeed", interval=2, on_timeout=cluster.report)

    links_path = f"/api/v2/dags/{PROBE_DAG}/dagRuns/{run_id}/taskInstances/{{task}}/links"
    links = api.ok_json("GET", links_path.format(task="register_report"))["extra_links"]
    assert set(links) == {"MLflow run", "Registered model version", "report.html"}, links
    assert all(links.values()), links
    # A task that pushed nothing shows no button (the UI skips null links).
    assert set(api.ok_json("GET", links_path.format(task="no_links"))["extra_links"].values()) == {None}

    # The task's log tells it at INFO, and nothing is logged as an error.
    log_files = list((cluster.home / "logs").rglob(f"dag_id={PROBE_DAG}/*/task_id=register_report/*.log"))
    records = [json.loads(line) for line in log_files[0].read_text().splitlines() if line.startswith("{")]
    assert [r["event"] for r in records if r.get("level") == "error"] == []
    assert any(r["event"] == f"MLflow run: {links['MLflow run']}" and r["level"] == "info" for r in records)

    # Each address opens what it names on a real MLflow server over the same store.
    mlflow_url = f"http://127.0.0.1:{ui['mlflow_port']}"
    run_page = re.fullmatch(re.escape(mlflow_url) + r"/#/experiments/(\w+)/runs/(\w+)", links["MLflow run"])
    assert run_page, links["MLflow run"]
    experiment_id, mlflow_run_id = run_page.groups()
    assert links["report.html"] == f"{links['MLflow run']}/artifacts/report/report.html"
    assert links["Registered model version"] == f"{mlflow_url}/#/models/ppo_PROBE_1d/versions/1"
    with mlflow_ui(ui["mlflow_dir"], ui["mlflow_port"], tmp_path):
        got = requests.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": mlflow_run_id}, timeout=30)
        assert got.status_code == 200, got.text[:500]
        assert got.json()["run"]["info"]["experiment_id"] == experiment_id
        report = requests.get(f"{mlflow_url}/get-artifact", timeout=30,
                              params={"path": "report/report.html", "run_uuid": mlflow_run_id})
        assert report.status_code == 200 and "probe report 7f3a" in report.text, report.text[:500]
        version = requests.get(f"{mlflow_url}/api/2.0/mlflow/model-versions/get", timeout=30,
                               params={"name": "ppo_PROBE_1d", "version": "1"})
        assert version.status_code == 200 and version.json()["model_version"]["run_id"] == mlflow_run_id
        page = requests.get(urlsplit(links["MLflow run"])._replace(fragment="").geturl(), timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()


class mlflow_ui:
    """`mlflow ui` over the store the tasks wrote, as the README runs it; stopped on exit."""

    def __init__(self, folder: Path, port: int, log_dir: Path):
        self.args = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                     f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)]
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_dir / "mlflow-ui.log"

    def __enter__(self):
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
        wait_for_http(f"{self.url}/health", 120, "mlflow ui", proc=self.proc,
                      on_timeout=lambda: self.log_path.read_text(errors="replace")[-3000:])
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        finally:
            self.log.close()


# ----------------------------------------------------------------------------------------------
# In a real browser: the trigger forms
# ----------------------------------------------------------------------------------------------
def log_in(page, base_url: str, password: str) -> None:
    page.goto(f"{base_url}/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/login" not in url)
    page.get_by_role("link", name="Dags").first.wait_for()


def open_trigger_form(page, base_url: str, dag_id: str):
    page.goto(f"{base_url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Run Parameters").wait_for()
    return dialog


@contextmanager
def logged_in_page(base_url: str, password: str):
    """A Chromium page, logged in to the UI; the browser is closed on exit."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's browser (apt-get install -y chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            log_in(page, base_url, password)
            yield page
        finally:
            browser.close()


def check_trigger_forms(base_url: str, password: str) -> None:
    """model_promotion waits for an action; ppo_training refuses an out-of-range budget, saying why."""
    from playwright.sync_api import expect

    with logged_in_page(base_url, password) as page:
        dialog = open_trigger_form(page, base_url, "model_promotion")
        expect(dialog.get_by_text("This field is required")).to_be_visible()
        expect(dialog.get_by_role("button", name="Trigger")).to_be_disabled()

        dialog = open_trigger_form(page, base_url, "ppo_training")
        timesteps = dialog.locator("input[name=element_timesteps]")
        timesteps.fill("5")
        timesteps.blur()
        expect(timesteps).to_have_value("5")  # kept as typed, not moved to the bound
        dialog.get_by_role("button", name="Trigger").click()
        expect(dialog.get_by_text("Invalid input for param timesteps: 5 is less than the minimum of 1024")
               ).to_be_visible()


def test_trigger_forms_refuse_bad_values_with_a_message(ui):
    check_trigger_forms(ui["base_url"], ui["password"])
    # No run was triggered by hand. (The refused trigger still unpaused ppo_training, as the form does
    # before triggering, which starts its nightly run; the form's tiny training is the next test.)
    for dag_id in ("model_promotion", "ppo_training"):
        runs = ui["api"].ok_json("GET", f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]
        assert [run for run in runs if run["run_type"] == "manual"] == [], dag_id


# ----------------------------------------------------------------------------------------------
# In a real browser: a tiny training typed into the form, then its MLflow run and report.html
# ----------------------------------------------------------------------------------------------
FORM_RUN = {"symbol": "GSPC", "timesteps": 1024, "num_envs": 8, "num_steps": 8, "n_folds": 1, "device": "cpu"}
RUN_TIMEOUT = float(os.environ.get("AIRFLOW_E2E_RUN_TIMEOUT", 900))  # the nightly run, then the form's


def trigger_tiny_training(page, base_url: str, paused: bool) -> None:
    """FORM_RUN typed into the ppo_training form (source left empty: the bundled sample) and triggered.
    A paused DAG is unpaused by the form's "unpause on trigger", ticked by default and left so."""
    from playwright.sync_api import expect

    dialog = open_trigger_form(page, base_url, "ppo_training")
    for name, value in FORM_RUN.items():
        if name != "device":
            field = dialog.locator(f"input[name=element_{name}]")
            field.fill(str(value))
            field.blur()
    # A choice of an enum: the combobox beside the hidden input that holds the value.
    device = dialog.locator("input[name=element_device]")
    device.locator("xpath=..").get_by_role("combobox").click()
    page.get_by_role("option", name=FORM_RUN["device"], exact=True).click()
    expect(device).to_have_value(FORM_RUN["device"])
    unpause = dialog.get_by_role("checkbox", name="Unpause ppo_training on trigger")
    expect(unpause).to_be_checked() if paused else expect(unpause).to_have_count(0)
    dialog.get_by_role("button", name="Trigger").click()
    expect(page.get_by_text("Dag run has been successfully triggered.")).to_be_visible()


def wait_for_the_form_run(ui) -> dict:
    """The one manual run of ppo_training, once it succeeded. Unpausing also starts the newest nightly
    run (tiny too, by $ML_TRAINING_CONFIG); max_active_runs=1 may queue the form's run behind it."""
    cluster, api = ui["cluster"], ui["api"]

    def succeeded():
        cluster.assert_running()
        runs = api.ok_json("GET", "/api/v2/dags/ppo_training/dagRuns")["dag_runs"]
        assert {run["run_type"] for run in runs} <= {"manual", "scheduled"}, runs
        assert all(run["state"] != "failed" for run in runs), f"{runs}\n{cluster.report()}"
        manual = [run for run in runs if run["run_type"] == "manual"]
        assert len(manual) <= 1, manual
        return manual[0] if manual and manual[0]["state"] == "success" else None

    return wait_until(succeeded, cluster.left(RUN_TIMEOUT), "the run triggered in the form to succeed",
                      interval=3, on_timeout=cluster.report)


def test_a_tiny_training_typed_into_the_form_opens_its_mlflow_run_and_report(ui, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    from ml.orchestration import run_dir_for

    base_url, mlflow_url = ui["base_url"], f"http://127.0.0.1:{ui['mlflow_port']}"
    with logged_in_page(base_url, ui["password"]) as page:
        # The refused trigger of the test before may have unpaused it already: the form unpauses first.
        trigger_tiny_training(page, base_url, ui["api"].ok_json("GET", "/api/v2/dags/ppo_training")["is_paused"])
        run = wait_for_the_form_run(ui)
        # As typed; source left empty (the config's source: the bundled sample).
        assert {key: run["conf"].get(key) for key in [*FORM_RUN, "source"]} == {**FORM_RUN, "source": None}, run
        run_id = run["dag_run_id"]
        run_name = f"ppo_training/{run_id}/GSPC"

        # The run's page lists its task instances; register's Details tab shows its extra links.
        page.goto(f"{base_url}/dags/ppo_training/runs/{quote(run_id, safe='')}")
        page.get_by_role("link", name="register", exact=True).click()
        page.get_by_role("link", name="Details", exact=True).click()
        page.get_by_text("Extra Links").wait_for()
        with mlflow_ui(ui["mlflow_dir"], ui["mlflow_port"], tmp_path):
            with page.expect_popup() as opened:
                page.get_by_role("link", name="MLflow run", exact=True).click()
            mlflow_page = opened.value
            expect(mlflow_page.get_by_role("heading", name=run_name)).to_be_visible(timeout=60_000)
            reached = re.fullmatch(re.escape(mlflow_url) + r"/#/experiments/\w+/runs/(\w+)", mlflow_page.url)
            assert reached, mlflow_page.url
            mlflow_run_id = reached.group(1)
            got = requests.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": mlflow_run_id}, timeout=30)
            assert got.status_code == 200, got.text[:500]
            data = {item["key"]: item["value"] for kind in ("tags", "params")
                    for item in got.json()["run"]["data"][kind]}
            # That training's run, trained with what was typed.
            trained = {"mlflow.runName": run_name, "symbol": "GSPC", "data.source": "sample", "ppo.device": "cpu",
                       "ppo.total_timesteps": "1024", "ppo.num_envs": "8", "ppo.num_steps": "8", "splits.n_folds": "1"}
            assert {key: data.get(key) for key in trained} == trained, data

            with page.expect_popup() as opened:
                page.get_by_role("link", name="report.html", exact=True).click()
            report_page = opened.value
            assert report_page.url == f"{mlflow_page.url}/artifacts/report/report.html", report_page.url
            expect(report_page.frame_locator("iframe").first.get_by_role(
                "heading", name="Walk-forward report: GSPC (1d)")).to_be_visible(timeout=60_000)
            report = requests.get(f"{mlflow_url}/get-artifact", timeout=30,
                                  params={"path": "report/report.html", "run_uuid": mlflow_run_id})
            assert report.status_code == 200, report.text[:500]
    # The pipeline's report of this run: the one in the run's folder, naming its MLflow run.
    monkeypatch.setenv("ML_RUNS_DIR", ui["cluster"].env["ML_RUNS_DIR"])
    assert report.content == (run_dir_for("ppo_training", run_id) / "GSPC" / "report.html").read_bytes()
    assert mlflow_run_id.encode() in report.content
