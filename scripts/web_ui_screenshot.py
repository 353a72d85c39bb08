"""Screenshot of the chat page in a real exchange with the built-in default model (SmolLM2-135M-Instruct).

The same setup as tests/system/test_web_ui.py: `a8w8-serve serve` as a process on 127.0.0.1, Debian's chromium
driven by Playwright. Greedy sampling (temperature 0 in the page's settings) so a rerun shows the same answer.

    .venv/bin/python scripts/web_ui_screenshot.py --out docs/web-ui.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import wait_healthy  # noqa: E402  (the test suite's helper: the same setup as the browser tests)

STARTUP_SECONDS = 600  # the very first start builds the default model (GGUF conversion, calibration)
ANSWER_TIMEOUT_MS = 180_000
VIEWPORT = {"width": 1100, "height": 760}
QUESTION = "Which city is the capital of France? Answer in one sentence, then list two sights to see there."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/web-ui.png"))
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()

    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "a8w8_serve", "serve", "--port", str(args.port)])
    try:
        wait_healthy(base, timeout=STARTUP_SECONDS, proc=proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{base}/")
            page.wait_for_function("() => document.getElementById('server-status').textContent === 'ready'")
            page.click("#open-settings")
            page.fill("#settings-form [name=temperature]", "0")
            page.fill("#settings-form [name=maxTokens]", str(args.max_tokens))
            page.click("#settings-save")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            page.wait_for_selector(".message.assistant .stats", timeout=ANSWER_TIMEOUT_MS)
            page.wait_for_function("() => !document.getElementById('send').hidden", timeout=ANSWER_TIMEOUT_MS)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            print(page.inner_text(".message.assistant"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
