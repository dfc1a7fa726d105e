"""Open every page of the built book in headless Chromium, offline, and check what a reader sees.

For each page of book/_build/html (every notebook, the introduction, the appendices):
  * the page was loaded with every remote host unreachable (``--host-resolver-rules``), so nothing
    it shows can come from the network;
  * every formula was typeset by the book's own MathJax: the DOM after scripts ran holds
    ``mjx-container`` elements, no MathJax error, and no raw ``$$`` or ``\\(`` left in the text;
  * every figure shows: each ``<img>`` points to a PNG inside the book that exists and decodes.

Usage: python book/check_book.py [path/to/html]   (exit status 1 with one line per failure)
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    sys.exit("book-check needs headless Chromium: `apt-get install chromium` (Debian/Ubuntu)")


def rendered_dom(exe: str, page: Path, profile: str) -> str:
    """The page's DOM after its scripts ran, with the network switched off."""
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--allow-file-access-from-files",
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def check_page(exe: str, page: Path, root: Path, profile: str) -> tuple[list[str], int, int]:
    dom = rendered_dom(exe, page, profile)
    failures = []
    formulas = len(re.findall(r"<mjx-container", dom))
    body = re.sub(r"<(script|style|pre|code)\b.*?</\1>", "", dom, flags=re.S)  # prose only
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    if "<mjx-merror" in dom:
        failures.append(f"{page.name}: a MathJax error is shown")
    if "$$" in text or "\\(" in text:
        failures.append(f"{page.name}: untypeset TeX left in the text")
    math_in_source = "math notranslate" in page.read_text() or "\\(" in page.read_text()
    if math_in_source and formulas == 0:
        failures.append(f"{page.name}: formulas in the page, none typeset (MathJax did not run)")
    images = re.findall(r'<img[^>]*src="([^"]+)"', dom)
    for src in images:
        if re.match(r"(https?:)?//", src):
            failures.append(f"{page.name}: image from another host: {src}")
            continue
        target = (page.parent / src.split("#")[0]).resolve()
        try:
            width, height = png_size(target) if target.suffix == ".png" else (1, 1)
            if not (target.is_relative_to(root) and width > 0 and height > 0):
                failures.append(f"{page.name}: image outside the book or empty: {src}")
        except (OSError, ValueError) as error:
            failures.append(f"{page.name}: image {src} does not show ({error})")
    notebook = Path("notebooks") / f"{page.stem}.ipynb"
    if page.parent.name == "notebooks" and notebook.is_file():
        stored = sum(
            "image/png" in o.get("data", {})
            for c in json.loads(notebook.read_text())["cells"]
            for o in c.get("outputs", [])
        )
        if len(images) < stored:
            failures.append(
                f"{page.name}: {len(images)} figures shown, the notebook stores {stored}"
            )
    return failures, formulas, len(images)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html").resolve()
    pages = sorted([*root.glob("notebooks/*.html"), *root.glob("book/*.html")])
    if not pages:
        sys.exit(f"no pages under {root}: run `make book` first")
    exe, failures = browser(), []
    with tempfile.TemporaryDirectory() as profile:
        for page in pages:
            page_failures, formulas, images = check_page(exe, page, root, profile)
            failures += page_failures
            print(
                f"{page.relative_to(root)}: {formulas} formulas typeset, {images} figures"
                + ("" if not page_failures else f", {len(page_failures)} FAILURES")
            )
    notebooks = [p for p in pages if p.parent.name == "notebooks"]
    if len(notebooks) != len(list(Path("notebooks").glob("*.ipynb"))):
        failures.append(
            f"{len(notebooks)} notebook pages for "
            f"{len(list(Path('notebooks').glob('*.ipynb')))} notebooks"
        )
    for failure in failures:
        print("FAIL", failure)
    print(
        f"book-check: {len(pages)} pages, "
        + ("all good" if not failures else f"{len(failures)} failures")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
