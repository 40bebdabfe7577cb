"""The README's dashboard screenshot: a finished job of a running server, its playground answered.

    dpo-lora serve --config configs/demo.yaml --models models        # and a job that succeeded
    python bench/dashboard_screenshot.py [--url http://127.0.0.1:8000] [--out docs/dashboard.png]

Drives Debian's chromium through Selenium (the test extra), as tests/serve/test_dashboard.py does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PROMPT = 'Continue this movie review with one sentence: "I watched The Marble Garden last night, and'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("DPO_LORA_API_KEY", ""))
    parser.add_argument("--out", default="docs/dashboard.png")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    wait = WebDriverWait(driver, 300, poll_frequency=0.3)
    try:
        driver.get(args.url + "/")
        driver.find_element(By.ID, "token").send_keys(args.api_key)
        driver.find_element(By.ID, "save-token").click()
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('tr.job td.succeeded').length"))
        driver.execute_script("document.querySelector('tr.job td.succeeded').parentElement.click()")
        wait.until(lambda d: d.execute_script("return !document.getElementById('playground').hidden"))
        for field, value in (("play-temperature", "0.7"), ("play-max", "48"), ("play-prompt", PROMPT)):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "play").click()
        wait.until(lambda d: d.find_element(By.ID, "play-status").text.startswith("answered"))
        time.sleep(2.5)  # one refresh of the charts
        driver.save_screenshot(args.out)
        print(f"{args.out}: {driver.find_element(By.ID, 'play-status').text}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
