"""The chat page of `longmem serve` in a real headless browser: Debian's chromium and chromedriver, driven by selenium.

Skipped, saying why, where no browser is installed (`make test` installs chromium where it can; as root:
``apt-get install chromium chromium-driver``). ``LONGMEM_SCREENSHOT=PATH`` saves what the page looks like at the
end (the README's picture comes from here).
"""

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'longmem[test]')")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from test_serve import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no headless browser here: install Debian's chromium "
                                                                  "and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_chat_page_adds_a_document_picks_the_memory_and_streams_a_reply(browser, tmp_path):
    server = Server(store=tmp_path / "store")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "longmem-tiny")
        assert "longmem" in browser.title
        # add a document to a new memory: it appears in the picker, selected, with its tokens
        browser.find_element(By.ID, "new-name").send_keys("austen")
        browser.find_element(By.ID, "document").send_keys("Mr Darcy lives at Pemberley in Derbyshire. " * 20)
        browser.find_element(By.ID, "add").click()
        wait.until(lambda d: "added" in d.find_element(By.ID, "status").text)
        picker = Select(browser.find_element(By.ID, "memory"))
        wait.until(lambda d: picker.first_selected_option.get_attribute("value") == "austen")
        assert "tokens" in browser.find_element(By.ID, "memory-info").text
        with server.http() as http:
            assert http.get("/v1/memories/austen").json()["tokens"] > 0
        # a message: the reply streams in (one line, as longmem chat's format), then the page takes the next one
        browser.find_element(By.ID, "message").send_keys("Where does Mr Darcy live?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == 1)
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        turns = browser.find_elements(By.CSS_SELECTOR, ".turn")
        assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"]
        assert turns[0].text == "Where does Mr Darcy live?"
        with server.http() as http:  # the page asked with the memory picked: the same reply as the API gives
            want = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Where does Mr Darcy live?"}], "memory": "austen",
                "temperature": 0}).json()["choices"][0]["message"]["content"]
        assert turns[1].text.strip() == want.strip() != ""
        if os.environ.get("LONGMEM_SCREENSHOT"):
            time.sleep(0.2)
            browser.save_screenshot(os.environ["LONGMEM_SCREENSHOT"])
        # an error is shown on the page, not thrown away: the memory picked is deleted behind the page's back
        with server.http() as http:
            assert http.delete("/v1/memories/austen").status_code == 200
        browser.find_element(By.ID, "message").send_keys("Hello?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.error"))
        assert "no memory named 'austen'" in browser.find_element(By.CSS_SELECTOR, ".turn.error").text
    finally:
        status, err = server.stop()
    assert status == 0 and "Traceback" not in err, err[-3000:]
