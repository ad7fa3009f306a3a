"""Render a run's report.html in headless Chromium and save a PNG of its top (docs/report.png in the README).

    python -m benchmarks.report_screenshot --run_dir save_results/dataset+demo/model+efficientnet_lite0/<run> \
        --output docs/report.png

Needs a Chromium binary (Debian: apt-get install chromium); the test suite does not use this. The page is shot at
--width x --height CSS pixels and scaled to --scaled_width for the file.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from evaluation.html_report import REPORT_HTML

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser(explicit: str | None) -> str:
    for name in ([explicit] if explicit else BROWSERS):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise SystemExit(f"no Chromium found (tried {', '.join(BROWSERS)}); install it (apt-get install chromium) or "
                     f"pass --browser PATH")


def main(args: argparse.Namespace) -> Path:
    report = Path(args.run_dir) / REPORT_HTML
    if not report.is_file():
        raise SystemExit(f"{report} not found; train a run with this version of main.py first")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "full.png"
        subprocess.run([find_browser(args.browser), "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--window-size={args.width},{args.height}",
                        f"--screenshot={shot}", report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        with Image.open(shot) as img:
            scaled = img.convert("RGB").resize((args.scaled_width, round(img.height * args.scaled_width / img.width)),
                                               Image.Resampling.LANCZOS)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    scaled.quantize(colors=128).save(output, optimize=True)
    print(f"{output}: {scaled.width}x{scaled.height}, {output.stat().st_size / 1024:.0f} KB")
    return output


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("report.html screenshot")
    parser.add_argument("--run_dir", required=True, help="run folder (or labelled-inference output) with report.html")
    parser.add_argument("--output", default="docs/report.png")
    parser.add_argument("--browser", default=None, help="Chromium binary (default: first of chromium, chrome on PATH)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=2300,
                        help="CSS pixels of the page to shoot from the top (default: title to figures)")
    parser.add_argument("--scaled_width", type=int, default=1000)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
