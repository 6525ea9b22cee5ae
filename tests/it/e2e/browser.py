"""A headless Chromium driven through selenium for the dashboard's browser test (tests/it/e2e/dashboard.rs).

Debian's chromium and chromium-driver are named explicitly, so selenium downloads nothing. The test sends
one JSON command a line on stdin and reads one JSON answer a line on stdout:

  {"cmd": "get", "url": U}                        -> {"ok": true}
  {"cmd": "size", "width": W, "height": H}        -> {"ok": true}
  {"cmd": "text", "css": S}                       -> {"ok": true, "value": [texts of every match]}
  {"cmd": "wait_text", "css": S, "text": T, "timeout": SECONDS}
                                                  -> {"ok": true} once an element matching S contains T
  {"cmd": "fill", "css": S, "value": V}           -> {"ok": true}
  {"cmd": "click", "css": S}                      -> {"ok": true}
  {"cmd": "js", "script": JS}                     -> {"ok": true, "value": what the script returned}
  {"cmd": "screenshot", "path": P}                -> {"ok": true} (the whole page)
  {"cmd": "console"}                              -> {"ok": true, "value": [console entries since last]}
  {"cmd": "axe"}                                  -> {"ok": true, "value": [serious or critical violations]}
  {"cmd": "url"}                                  -> {"ok": true, "value": current URL}

A failed command answers {"ok": false, "error": ...}; end of input quits the browser.
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1280,900"]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def run(d, c):
    cmd = c["cmd"]
    if cmd == "get":
        d.get(c["url"])
    elif cmd == "size":
        d.set_window_size(c["width"], c["height"])
    elif cmd == "text":
        return [e.text for e in d.find_elements(By.CSS_SELECTOR, c["css"])]
    elif cmd == "wait_text":
        # The texts are read in one script, so no element reference can go stale between finding and
        # reading. A navigation under way can still fail the read itself (a stale reference, a replaced
        # document, an execution context that went away): that is the page changing, so look again.
        deadline = time.monotonic() + c.get("timeout", 30)
        last_error = None
        while True:
            try:
                texts = d.execute_script(
                    "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)", c["css"])
                if any(c["text"] in t for t in texts):
                    return None
            except WebDriverException as e:
                last_error = e

            if time.monotonic() > deadline:
                raise TimeoutError("no %s containing %r (last error: %s); page: %s"
                                   % (c["css"], c["text"], last_error, d.page_source[-3000:]))
            time.sleep(0.1)
    elif cmd == "fill":
        e = d.find_element(By.CSS_SELECTOR, c["css"])
        e.clear()
        e.send_keys(c["value"])
    elif cmd == "click":
        d.find_element(By.CSS_SELECTOR, c["css"]).click()
    elif cmd == "js":
        return d.execute_script(c["script"])
    elif cmd == "screenshot":
        # The whole page: the window grows to the document's height for the shot.
        w = d.get_window_size()["width"]
        h = d.execute_script("return Math.max(document.body.scrollHeight, 300)")
        old = d.get_window_size()["height"]
        d.set_window_size(w, min(h + 100, 6000))
        d.save_screenshot(c["path"])
        d.set_window_size(w, old)
    elif cmd == "console":
        return [{"level": e["level"], "message": e["message"]} for e in d.get_log("browser")]
    elif cmd == "axe":
        from axe_selenium_python import Axe
        axe = Axe(d)
        axe.inject()
        result = axe.run()
        return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
                 "nodes": [n["html"] for n in v["nodes"]][:3]}
                for v in result["violations"] if v["impact"] in ("serious", "critical")]
    elif cmd == "url":
        return d.current_url
    else:
        raise ValueError("unknown command %r" % cmd)
    return None


def main():
    d = browser()
    try:
        print(json.dumps({"ok": True, "value": "ready"}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                value = run(d, json.loads(line))
                out = {"ok": True, "value": value}
            except Exception as e:  # noqa: BLE001 - every failure goes back to the test
                out = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
            print(json.dumps(out), flush=True)
    finally:
        d.quit()


if __name__ == "__main__":
    main()
