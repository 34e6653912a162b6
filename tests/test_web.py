"""The web chat page at /, driven in headless Chromium: type a message, read the streamed reply.

Needs Chromium and chromedriver (``apt-get install chromium chromium-driver``; .ci/run installs
them in CI) and Selenium; skipped with the reason where they are missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from servers import serve

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402, N812
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not installed")
SCREENSHOT = os.environ.get("NANOCHAT_WEB_SCREENSHOT")  # where to save a screenshot of the streamed reply


@pytest.fixture(scope="module")
def server():
    with serve("--max-concurrency", "4", backend="mlx") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(browser, seconds: float = 60) -> WebDriverWait:
    return WebDriverWait(browser, seconds)


def open_page(server, browser, max_tokens: int = 48) -> None:
    """The page, connected to the model, with a short reply length set in its settings."""
    browser.get(server.url + "/")
    wait(browser).until(EC.text_to_be_present_in_element((By.ID, "model"), "g1"))
    set_max_tokens(browser, max_tokens)


def set_max_tokens(browser, max_tokens: int) -> None:
    browser.find_element(By.ID, "settings-toggle").click()
    field = browser.find_element(By.ID, "max_tokens")
    field.clear()
    field.send_keys(str(max_tokens), Keys.TAB)
    browser.find_element(By.ID, "settings-toggle").click()


def last_reply(browser) -> str:
    """The last reply's text (read in the page: its element is redrawn as the reply streams)."""
    return browser.execute_script(
        "return document.querySelector('.message.assistant:last-child .body')?.textContent.trim() ?? ''"
    )


def reply_done(browser) -> None:
    wait(browser).until(lambda b: not b.find_element(By.ID, "send").get_attribute("hidden"))


def test_a_typed_message_streams_a_reply_into_the_page(server, browser):
    open_page(server, browser)
    prompt = browser.find_element(By.ID, "prompt")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=prompt]").text == "Message"
    prompt.send_keys("Write some code", Keys.ENTER)
    reply = wait(browser).until(lambda b: b.find_element(By.CSS_SELECTOR, ".message.assistant .body").text.strip())
    assert reply
    reply_done(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".message.user .body").text == "Write some code"
    assert "tok/s" in browser.find_element(By.ID, "speed").text
    if SCREENSHOT:
        browser.save_screenshot(str(Path(SCREENSHOT)))


def test_conversations_survive_a_reload_and_new_chat_starts_empty(server, browser):
    open_page(server, browser)
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "prompt").send_keys("Remember me", Keys.ENTER)
    reply_done(browser)
    browser.refresh()
    wait(browser).until(lambda b: "Remember me" in b.find_element(By.ID, "conversations").text)
    assert "Remember me" in browser.find_element(By.ID, "log").text
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_element(By.ID, "log").text == ""
    assert browser.switch_to.active_element == browser.find_element(By.ID, "prompt")  # ready to type


def test_stop_ends_a_streaming_reply(server, browser):
    open_page(server, browser, max_tokens=600)
    # Press Stop from inside the page the moment the first text shows (a tiny model streams a
    # whole reply faster than a WebDriver round trip).
    browser.execute_script("""
        new MutationObserver((_, observer) => {
          const body = document.querySelector('.message.assistant:last-child .body');
          if (body && body.textContent && !document.getElementById('stop').hidden) {
            observer.disconnect(); document.getElementById('stop').click();
          }
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    """)
    browser.find_element(By.ID, "prompt").send_keys("Tell me everything", Keys.ENTER)
    wait(browser).until(lambda b: "(stopped)" in b.find_element(By.CSS_SELECTOR, ".message.assistant:last-child").text)
    reply_done(browser)  # Send is back: a new message can be typed


def test_markdown_renders_code_blocks_with_highlighting(server, browser):
    browser.get(server.url + "/")
    html = browser.execute_script(
        "return Markdown.render('# Title\\n\\nSome **bold** and `x<y`\\n\\n```python\\ndef f(): return 1 # hi\\n```')"
    )
    assert "<h3>Title</h3>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert '<pre data-lang="python"><code><span class="tok-k">def</span>' in html
    assert '<span class="tok-c"># hi</span>' in html
    assert "<script>" not in browser.execute_script("return Markdown.render('<script>alert(1)</script>')")


def test_a_failed_send_puts_the_message_back_and_the_retry_goes_through(server, browser):
    open_page(server, browser, max_tokens=5000)  # over the server's limit: refused
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "prompt").send_keys("Try me", Keys.ENTER)
    error = wait(browser).until(lambda b: b.find_element(By.ID, "error").text)
    assert "max_tokens" in error
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Try me"
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")  # nothing half-sent stays behind
    set_max_tokens(browser, 48)
    browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)  # the message is still in the box
    wait(browser).until(last_reply)
    reply_done(browser)
    assert browser.find_element(By.ID, "error").get_attribute("hidden")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message.user .body")] == ["Try me"]


def test_a_chat_over_the_context_drops_its_oldest_turns_and_goes_on(server, browser):
    browser.get(server.url + "/")
    turns = [{"role": r, "content": f"{r} turn {i} " + "words " * 40} for i in range(12) for r in ("user", "assistant")]
    chats = [{"id": "long", "title": "long", "messages": turns}]
    browser.execute_script("localStorage.setItem('nanochat.conversations', JSON.stringify(arguments[0]))", chats)
    open_page(server, browser)
    browser.find_element(By.ID, "prompt").send_keys("And now?", Keys.ENTER)
    wait(browser).until(last_reply)
    reply_done(browser)
    assert browser.find_element(By.ID, "error").get_attribute("hidden")
    marker = browser.find_element(By.CSS_SELECTOR, ".forgotten").text
    assert marker.startswith("The model no longer sees the ") and marker.endswith(
        "messages above (its context is full)."
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 26  # every turn stays on the page


def test_a_long_chat_scrolls_inside_the_log_and_the_page_stays_put(server, browser):
    browser.get(server.url + "/")
    turns = [{"role": r, "content": "many words " * 300} for r in ("user", "assistant")] * 4
    chats = [{"id": "tall", "title": "tall", "messages": turns}]
    browser.execute_script("localStorage.setItem('nanochat.conversations', JSON.stringify(arguments[0]))", chats)
    open_page(server, browser)
    heights = "[document.scrollingElement.scrollHeight, innerHeight, document.getElementById('log').scrollHeight]"
    page, window, log = browser.execute_script(f"return {heights}")
    assert log > window and page == window  # the header and the message box stay on screen
