"""Fixtures of the real-browser tests: a throwaway JupyterLab server, and the node driver (drive.mjs).

The server runs from this interpreter's environment (the project's .venv) on 127.0.0.1 with a random
token, and keeps everything it writes in a temp dir: runtime, config, data, lab settings and workspaces,
IPython's profile, and the notebooks it serves (copies). The "Jupyter news" toast and the update check are
off (command line and the lab's user settings), so no toast covers the widgets and nothing goes online.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHROMIUM = Path(os.environ.get("GXPO_CHROMIUM", "/usr/bin/chromium"))
PLAYWRIGHT = HERE / "node_modules" / "playwright-core"
DRIVER = HERE / "drive.mjs"
SCREENSHOTS = REPO / "runs" / "browser"  # a copy for humans (runs/ is git-ignored)


def missing_tools() -> str | None:
    """Why the browser tests cannot run here, or None. tests/browser/setup.sh installs what is missing."""
    reasons = []
    if shutil.which("node") is None:
        reasons.append("node is not on PATH")
    if not CHROMIUM.exists():
        reasons.append(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    if not (PLAYWRIGHT / "package.json").exists():
        reasons.append(f"{PLAYWRIGHT.relative_to(REPO)} is missing (npm ci in tests/browser)")
    try:
        import ipywidgets  # noqa: F401
        import jupyterlab  # noqa: F401
    except ImportError as error:
        reasons.append(f"{error.name} is not installed in this environment (the notebooks extra)")
    if not reasons:
        return None
    return "browser tests skipped: " + "; ".join(reasons) + "; tests/browser/setup.sh installs them"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (tests/browser)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


@dataclass
class Lab:
    """A running JupyterLab: its address, token and the folder it serves."""

    url: str
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stop every kernel (frees the CPU between tests); quiet if the server is gone."""
        try:
            for kernel in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        except OSError:
            pass

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]


def start_lab(base: Path, timeout: float = 90.0) -> Lab:
    """Start `python -m jupyterlab` with all its state under `base`; returns once /api/status answers."""
    dirs = {name: base / name for name in ("root", "config", "data", "runtime", "ipython", "settings",
                                           "workspaces")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    # The lab's user settings: no news / update toasts (the same as answering "No" to its question).
    _write_json(dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_DATA_DIR": str(dirs["data"]),
           "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]), "IPYTHONDIR": str(dirs["ipython"]),
           "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
           "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("JUPYTER_PATH", None)
    token, port = secrets.token_hex(16), _free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={dirs['root']}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = base / "jupyterlab.log"
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=dirs["root"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, dirs["root"], log, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("GET", "/api/status")
            return lab
        except OSError:
            if time.monotonic() > deadline:
                stop_lab(lab)
                raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s:\n{lab.log_tail()}")
            time.sleep(0.3)


def stop_lab(lab: Lab) -> None:
    """Shut the server down (it stops its kernels); kill it if it hangs."""
    if lab.process.poll() is None:
        try:
            lab.api("POST", "/api/shutdown")
        except OSError:
            lab.process.terminate()
        try:
            lab.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(lab.process.pid, signal.SIGKILL)  # its session: the server and what it started
            lab.process.wait(timeout=5)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    reason = missing_tools()
    if reason and os.environ.get("GXPO_REQUIRE_BROWSER"):
        pytest.fail(reason + " (GXPO_REQUIRE_BROWSER is set, as in CI)")
    if reason:
        pytest.skip(reason)
    server = start_lab(tmp_path_factory.mktemp("jupyterlab"))
    try:
        yield server
    finally:
        stop_lab(server)


@pytest.fixture(scope="session")
def drive():
    """`drive(lab, scenario, notebook, out, timeout)`: run drive.mjs, return its RESULT (see run_driver)."""
    return run_driver


def run_driver(lab: Lab, scenario: str, notebook: str, out: Path, timeout: float, **extra) -> dict:
    """Run `node drive.mjs` for one scenario; returns the JSON it reports, fails the test with its log."""
    out.mkdir(parents=True, exist_ok=True)
    options = {"scenario": scenario, "url": lab.url, "token": lab.token, "root": str(lab.root),
               "notebook": notebook, "out": str(out), **extra}
    start = time.monotonic()
    # its own process group, so a timeout also ends the Chromium processes playwright started
    process = subprocess.Popen(["node", str(DRIVER), json.dumps(options)], cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"drive.mjs {scenario} ran past {timeout:.0f} s\n--- driver log\n{stderr[-6000:]}"
                    f"\n--- jupyterlab log\n{lab.log_tail()}", pytrace=False)
    seconds = time.monotonic() - start
    shots = sorted(out.glob("*.png"))
    copies = SCREENSHOTS / scenario
    if shots:
        shutil.rmtree(copies, ignore_errors=True)
        copies.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, copies / shot.name)
    print(f"\n[{scenario}] driver: {seconds:.1f} s, rc {process.returncode}; screenshots in {out} "
          f"(copied to {copies}):")
    for shot in shots:
        print("   ", copies / shot.name)
    print(stderr[-3000:])
    if process.returncode != 0:
        pytest.fail(f"drive.mjs {scenario} failed (rc {process.returncode}):\n{stderr[-8000:]}\n"
                    f"{stdout[-2000:]}\n--- jupyterlab log\n{lab.log_tail()}", pytrace=False)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"drive.mjs {scenario} reported nothing:\n{stdout[-2000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["driver_seconds"] = seconds
    return result
