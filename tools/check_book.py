"""Open the built book in headless Chromium, offline, and check what a reader would see.

Serves book/_build/html from a loopback server, loads each chapter page with Chromium (no
network beyond 127.0.0.1), waits for MathJax, and checks the rendered DOM: the maths was typeset
(MathJax's <mjx-container> elements, no raw "$$" left), every figure's <img> is present and its
file is non-empty, and no page loads a script or stylesheet from outside the site.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "book" / "_build" / "html"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=15000", "--run-all-compositor-stages-before-draw"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        sys.exit("check_book: Chromium not found (install Debian's `chromium` package)")
    bar = "!" * 100
    print(f"\n{bar}\ncheck_book: SKIPPED, Chromium not found. The built book was NOT checked in a "
          "browser (maths typeset,\nfigures present, nothing loaded from outside). Install "
          "Debian's `chromium` package to run this check;\nin CI (CI=true) it is required.\n"
          f"{bar}")
    sys.exit(0)


def serve() -> tuple[socketserver.TCPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def render(url: str, profile: str, screenshot: Path | None = None) -> str:
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if screenshot is not None:
        subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={screenshot}", "--window-size=1280,2000", url],
                       capture_output=True, timeout=120)
    return out.stdout


def main() -> int:
    pages = sorted((HTML / "chapters").glob("*.html"))
    if not pages:
        print(f"check_book: no chapter pages under {HTML}; run `make book` first")
        return 1
    chromium()  # outside CI, a missing browser skips the check loudly instead of failing
    httpd, port = serve()
    failures = []
    shots = ROOT / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as profile:
            for page in pages:
                rel = page.relative_to(HTML).as_posix()
                dom = render(f"http://127.0.0.1:{port}/{rel}", profile,
                             shots / f"{page.stem}.png")
                math = len(re.findall(r"<mjx-container", dom))
                imgs = re.findall(r'<img[^>]+src="([^"]+)"', dom)
                figs = [s for s in imgs if "_images/" in s or s.startswith("data:image")]
                missing = [s for s in figs if not s.startswith("data:") and
                           not (page.parent / s).resolve().is_file()]
                loaded = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', dom)
                # MathJax loads its extensions by absolute URL: from this server, it is the site
                site = f"http://127.0.0.1:{port}/"
                external = [u for u in loaded if not u.startswith(site)]
                missing += [u for u in loaded if u.startswith(site)
                            and not (HTML / u[len(site):].split("?")[0]).is_file()]
                raw = page.read_text(encoding="utf-8")
                wants_math = "math notranslate" in raw
                wants_figs = raw.count("<img") - raw.count("logo")
                problems = []
                if not dom.strip():
                    problems.append("Chromium returned an empty page")
                if wants_math and math == 0:
                    problems.append("maths was not typeset (no <mjx-container>)")
                if wants_figs > 0 and not figs:
                    problems.append("no figures rendered")
                if missing:
                    problems.append(f"figure files missing: {missing[:3]}")
                if "<audio" in raw and not re.search(r'<audio[^>]*>\s*<source[^>]+src="data:audio', dom):
                    problems.append("an audio player lost its embedded sound")
                if external:
                    problems.append(f"loads from outside the site: {external[:3]}")
                status = "ok" if not problems else "FAIL: " + "; ".join(problems)
                print(f"  {rel:40s} maths {math:4d}  figures {len(figs):3d}  {status}")
                if problems:
                    failures.append(rel)
    finally:
        httpd.shutdown()
    print(f"book check: {len(pages) - len(failures)} of {len(pages)} pages render completely "
          f"offline (screenshots in {shots.relative_to(ROOT)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
