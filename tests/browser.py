"""Opening a report file in a real headless Chromium (Debian's, driven by playwright) with the network
cut off: every request the page makes is recorded, and any that is not the file itself (or a data:
or blob: URL) is aborted, so a page that needs the internet shows it as a request that left.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Chromium's own background traffic (updates, sync, field trials, QUIC probes) switched off, so that
# every request seen is one the page made.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LOCAL_SCHEMES = ("file:", "data:", "blob:")


def launch(executable: str) -> Iterator[Any]:
    """A headless Chromium for the session (playwright cannot download its own browser here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class OpenedPage:
    """What happened while a page loaded offline, and the live page to inspect further."""

    page: Any
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    left: list[str] = field(default_factory=list)  # those that would have left the machine (aborted)
    failed: list[str] = field(default_factory=list)  # requests that failed, with why
    console_errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    def broken_images(self) -> list[str]:
        """The src of each <img> that did not load (naturalWidth 0)."""
        return self.page.eval_on_selector_all(
            "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")

    def dead_links(self) -> list[str]:
        """Each <a href> that leads nowhere: an in-page anchor with no element of that id, or a file
        URL whose file does not exist, or anything off the machine."""
        links = self.page.eval_on_selector_all(
            "a[href]", "links => links.map(a => [a.getAttribute('href'), a.href])")
        dead = []
        for raw, resolved in links:
            if raw.startswith("#"):
                target = raw[1:]
                if not target or not self.page.evaluate("id => document.getElementById(id) !== null", target):
                    dead.append(raw)
            elif resolved.startswith("file://"):
                if not Path(resolved.removeprefix("file://").split("#")[0].split("?")[0]).exists():
                    dead.append(raw)
            elif not resolved.startswith(("data:", "blob:")):
                dead.append(raw)
        return dead


def open_offline(browser: Any, path: Path) -> OpenedPage:
    """Load ``path`` as a file:// URL with no network: requests off the machine are aborted and
    recorded. The caller closes ``opened.page.context``."""
    context = browser.new_context()
    page = context.new_page()
    opened = OpenedPage(page)

    def route(route: Any) -> None:
        url = route.request.url
        opened.requests.append(url)
        if url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:
            opened.left.append(url)
            route.abort("internetdisconnected")

    page.route("**/*", route)
    page.on("requestfailed", lambda request: opened.failed.append(f"{request.url[:100]}: {request.failure}"))
    page.on("console", lambda message: opened.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: opened.console_errors.append(f"uncaught: {error}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_load_state("networkidle")
    return opened
