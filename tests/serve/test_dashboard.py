"""The dashboard at GET / in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): the token typed into the page, jobs created from its form, a finished job's
charts, checkpoints, events and log, its playground answering beside the base, a running job's chart
gaining points and its log its progress bar, and a cancel from its button."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import wait_for_status

SCREENSHOT = os.environ.get("DPO_LORA_DASHBOARD_SCREENSHOT")  # where to keep the finished job's page (docs/)


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver_path):
        reason = "the browser test needs selenium, chromium and chromedriver (Debian: chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs them")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.3).until(lambda d: condition(d), message=what)


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def texts(driver, selector: str) -> list[str]:
    """The text of every element matching `selector`, read in one go (the page redraws every 2 s)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.textContent)", selector
    )


def row_status(driver, job_id: str) -> str | None:
    found = texts(driver, f'tr[data-job="{job_id}"] td.status')
    return found[0] if found else None


def points(driver, series: str, chart: str = "loss") -> int:
    """Markers of one series (the matplotlib line whose SVG id is the series name) in the page."""
    return driver.execute_script(
        "return document.querySelectorAll(`#chart-${arguments[1]} g[id='${arguments[0]}'] use`).length", series, chart
    )


def create_from_form(driver, train: Path, options: str, validation: Path | None = None) -> str:
    """Fill the form and submit it; returns the id of the job the page then shows."""
    previous = driver.execute_script("return selected")
    by_css(driver, "#training-file")[0].send_keys(str(train))
    if validation is not None:
        by_css(driver, "#validation-file")[0].send_keys(str(validation))
    field = by_css(driver, "#options")[0]
    field.clear()
    field.send_keys(options)
    by_css(driver, "#create")[0].click()

    def new_job(d):
        shown = d.execute_script("return selected")
        return shown if shown not in (None, previous) else False

    return wait(driver, new_job, 30, "the new job")


def http_status(server, path: str) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1{path}", headers={"Authorization": f"Bearer {server.api_key}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_dashboard_creates_charts_and_cancels_jobs_in_a_real_browser(servers, tiny_setup, browser, tmp_path):
    models, config, train, evaluation = tiny_setup
    server = servers(models, config)
    client = server.client()
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait(browser, lambda d: "Incorrect API key" in texts(d, "#message")[0], 30, "the refusal without a key")
    by_css(browser, "#token")[0].send_keys(server.api_key)
    by_css(browser, "#save-token")[0].click()
    wait(browser, lambda d: texts(d, "#model option") == ["tiny-llama"], 30, "the model list")

    # A short job with a validation file, to the end: its charts, checkpoints and events.
    # Its KL bound is set so low that the trainer's health monitor warns: the page marks the warning.
    options = '{"train": {"max_steps": 30, "save_every": 10, "eval_every": 10}, "monitor.kl_nats_per_token": 1e-6}'
    finished = create_from_form(browser, train, options, evaluation)
    wait_for_status(client, finished, ("succeeded",), timeout=240)
    wait(browser, lambda d: row_status(d, finished) == "succeeded", 30, "succeeded in the table")
    wait(browser, lambda d: points(d, "loss") == 30, 30, "30 training points on the loss chart")
    assert points(browser, "eval/loss") == 4  # before training, then at steps 10, 20, 30
    assert points(browser, "rewards/accuracies", "rewards") == 30 and points(browser, "logps/rejected", "logps") == 30
    assert texts(browser, "#checkpoints tr td:first-child") == ["30", "20", "10"]
    # The events list may show the ending a refresh after the jobs table does.
    wait(browser, lambda d: any("successfully completed" in e for e in texts(d, "#events li")), 30, "the success event")
    assert texts(browser, f'tr[data-job="{finished}"] td')[3] == "30 / 30"
    warned = texts(browser, "#events li.warn")
    assert any("\u26a0 KL growth at step" in e and "monitor.kl_nats_per_token=1e-06" in e for e in warned), warned
    # Its log: the trainer's output, to its last line, each progress bar line as its last redraw.
    wait(browser, lambda d: "the adapter is in" in texts(d, "#log")[0], 30, "the trainer's last line in the log")
    assert "\r" not in texts(browser, "#log")[0] and "dpo: 100%" in texts(browser, "#log")[0]
    for path, status in ((f"/fine_tuning/jobs/{finished}/log?after=-1", 400), ("/fine_tuning/jobs/nope/log", 404)):
        assert http_status(server, path) == status, path
    # The playground: one prompt to the fine-tuned model and to its base, streamed side by side.
    wait(browser, lambda d: texts(d, "#play-model option")[:1] == [client.fine_tuning.jobs.retrieve(finished).fine_tuned_model], 30, "the fine-tuned model to play with")  # fmt: skip
    assert len(texts(browser, "#play-model option")) == 4, "the model and its three checkpoints"
    assert browser.execute_script("return document.getElementById('play-model').value") == client.fine_tuning.jobs.retrieve(finished).fine_tuned_model, "the final model is asked unless another is picked"  # fmt: skip
    for field, value in (
        ("#play-temperature", "0"),
        ("#play-max", "24"),
        ("#play-prompt", "Review the film in one line"),
    ):
        by_css(browser, field)[0].clear()
        by_css(browser, field)[0].send_keys(value)
    by_css(browser, "#play")[0].click()
    wait(browser, lambda d: texts(d, "#play-status")[0].startswith("answered"), 120, "both answers")
    base, tuned = texts(browser, "#play-base")[0], texts(browser, "#play-tuned")[0]
    assert base and tuned and base != tuned, (base, tuned)
    assert texts(browser, "#play-base-name") == ["tiny-llama"]
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    if SCREENSHOT:
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)

    # A long job: running, its chart gains points as the run logs, then the Cancel button.
    running = create_from_form(browser, train, '{"train": {"max_steps": 4000, "save_every": 0}}')
    wait(browser, lambda d: row_status(d, running) == "running", 60, "running in the table")
    wait(browser, lambda d: points(d, "loss") >= 2, 120, "points on the running job's chart")
    wait(browser, lambda d: "dpo:" in texts(d, "#log")[0], 30, "the running job's progress bar in its log")
    seen = points(browser, "loss")
    wait(browser, lambda d: points(d, "loss") > seen, 60, "the chart to gain points")
    assert texts(browser, f'tr[data-job="{running}"] td')[5] != ""  # an ETA while it runs
    by_css(browser, "#cancel")[0].click()
    wait(browser, lambda d: row_status(d, running) == "cancelled", 30, "cancelled in the table")
    assert texts(browser, "#job-status") == ["cancelled"]
    assert client.fine_tuning.jobs.retrieve(running).status == "cancelled"


def test_the_dashboard_shows_each_key_only_its_projects_jobs(servers, tiny_setup, browser, tmp_path):
    """Two projects' keys typed into the same page in turn: each sees its own job and models, never
    the other's; the page keeps no trace of the first key's jobs after the switch."""
    import json

    from .test_hostile import KEYS

    models, config, train, _ = tiny_setup
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = servers(models, config, "--api-keys", str(keys))
    jobs = {}
    for project, key in KEYS.items():
        client = server.client(key)
        file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
        jobs[project] = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id, method={"type": "dpo"}, extra_body={"dpo_lora": {"train.max_steps": 1}}).id  # fmt: skip
    browser.get(f"http://127.0.0.1:{server.port}/")
    for project in ("team-a", "team-b", "team-a"):
        token = by_css(browser, "#token")[0]
        token.clear()
        token.send_keys(KEYS[project])
        by_css(browser, "#save-token")[0].click()
        other = jobs["team-b" if project == "team-a" else "team-a"]

        def shows_only_its_own(d, mine=jobs[project], theirs=other):
            shown = d.execute_script("return Array.from(document.querySelectorAll('tr[data-job]'), (r) => r.dataset.job)")  # fmt: skip
            return shown == [mine] and theirs not in d.page_source

        wait(browser, shows_only_its_own, 30, f"{project}'s job alone")
