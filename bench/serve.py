"""Seconds from `personal-gpt serve` to the first page rendered in a real browser,
and the server's memory before any model loads, beside a one-line Streamlit app
started the same way in the same run.

    .venv/bin/python bench/serve.py [--runs 3]

Targets (issue 2): under 3 s to the first page with no torch import on that
path; under 300 MB resident before the model loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.server import free_port  # noqa: E402

CHROMIUM = os.environ.get("PGPT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MB), from /proc."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(x) for x in out]
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def torch_loaded(pid: int) -> bool:
    pids = [pid] + [int(x) for x in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    for p in pids:
        try:
            if "libtorch" in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            pass
    return False


def measure(cmd: list[str], heading: str, browser, env: dict, port: int) -> tuple[float, float, bool]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = browser.new_page()
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/", timeout=2000)
                break
            except Exception:  # noqa: BLE001 - server not up yet
                if time.perf_counter() - t0 > 60:
                    raise
                time.sleep(0.05)
        page.get_by_role("heading", name=heading).first.wait_for(timeout=60_000)
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        rss = tree_rss_mb(proc.pid)
        torch = torch_loaded(proc.pid)
        page.close()
        return elapsed, rss, torch
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp())
    hello = tmp / "hello.py"
    hello.write_text("import streamlit as st\nst.title('Hello')\n")
    env = {**os.environ, "PERSONAL_GPT_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}
    exe = shutil.which("personal-gpt", path=str(Path(sys.executable).parent)) or "personal-gpt"
    rows = {"baseline": [], "ours": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for _ in range(args.runs):
            port = free_port()
            rows["baseline"].append(measure(
                [sys.executable, "-m", "streamlit", "run", str(hello), "--server.port", str(port), "--server.headless",
                 "true", "--browser.gatherUsageStats", "false"], "Hello", browser, env, port))
            port = free_port()
            rows["ours"].append(measure([exe, "serve", "--port", str(port)], "My GPTs", browser, env, port))
        browser.close()
    shutil.rmtree(tmp, ignore_errors=True)

    def med(name, i):
        return statistics.median(r[i] for r in rows[name])

    print(f"{'':34}{'ours':>10}{'baseline':>10}{'ratio':>8}")
    print(f"{'serve -> first page rendered (s)':34}{med('ours', 0):>10.2f}{med('baseline', 0):>10.2f}"
          f"{med('ours', 0) / med('baseline', 0):>8.2f}")
    print(f"{'server memory, no model (MB)':34}{med('ours', 1):>10.0f}{med('baseline', 1):>10.0f}"
          f"{med('ours', 1) / med('baseline', 1):>8.2f}")
    loaded = any(r[2] for r in rows["ours"])
    print(f"torch loaded before the first chat: {'yes' if loaded else 'no'}")
    print(f"target first page < 3 s: {'met' if med('ours', 0) < 3 else 'NOT met'}; "
          f"memory < 300 MB: {'met' if med('ours', 1) < 300 else 'NOT met'}; "
          f"no torch: {'met' if not loaded else 'NOT met'}")


if __name__ == "__main__":
    main()
