"""Measure what the instructor's kit states (`gxpo_lib.teach.instructor_kit` reads the JSON it writes there).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_kit.py notebooks      # each notebook headless once
    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_kit.py live --seeds 0 1 2   # notebook 02 live, per seed

Wall and CPU seconds of a fresh Python (everything it waited for, the papermill kernel included) and the
1-minute load at its start and end; `uptime`'s load, the machine and the date go with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "docs" / "instructor"
NOTEBOOKS = ("01_toy_extrapolation", "02_grpo_vs_gxpo_small_llama", "03_full_scale_run", "04_compare_runs",
             "05_when_does_extrapolation_pay")


def machine() -> str:
    """The CPU model, cores, memory and thread setting, in words."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-core {model}, {memory:.0f} GiB, no GPU, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")


def _timed_child(code: str) -> dict[str, float]:
    """Run `code` in a fresh Python; wall and CPU seconds (the child and everything it waited for)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"the measured command failed ({status}): {code}")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2)}


def measure_notebooks(out: Path, names: tuple[str, ...] = NOTEBOOKS, workdir: str = "/tmp/gxpo-kit-nb") -> dict:
    """Each notebook headless once on its defaults (papermill, as `make run`), kernel start included."""
    path = out / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {"notebooks": {}}
    for name in names:
        code = ("from gxpo_lib.teach.headless import execute_notebook;"
                f"execute_notebook('notebooks/{name}.ipynb', '{workdir}/{name}', html=False)")
        data["notebooks"][name] = _timed_child(code)
        data["machine"], data["date"] = machine(), time.strftime("%Y-%m-%d")
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(name, data["notebooks"][name], flush=True)
    return data


def measure_live(out: Path, seeds: list[int], workdir: str = "/tmp/gxpo-kit-live") -> dict:
    """Notebook 02's live configuration (``replay=False``, its defaults) for GRPO and GXPO at each seed."""
    path = out / "live_seeds.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for seed in seeds:
        for algorithm in ("grpo", "gxpo"):
            code = ("import json, sys; from gxpo_lib.teach.instructor_kit import nb02_config; "
                    "from gxpo_lib.rl.trainer import train;"
                    f"train(nb02_config('{algorithm}', {seed}), '{workdir}/{algorithm}_seed{seed}')")
            timing = _timed_child(code)
            metrics = Path(f"{workdir}/{algorithm}_seed{seed}/metrics.jsonl")
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            evals = [r for r in rows if r["kind"] == "eval"]
            data["runs"][f"{algorithm}_seed{seed}"] = {
                "algorithm": algorithm, "seed": seed, "pass@1": [round(r["pass@1"], 4) for r in evals],
                "steps": [r["step"] for r in evals], **timing}
            data["machine"], data["date"] = machine(), time.strftime("%Y-%m-%d")
            path.write_text(json.dumps(data, indent=1) + "\n")
            print(algorithm, seed, data["runs"][f"{algorithm}_seed{seed}"], flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["notebooks", "live"])
    parser.add_argument("--out", type=Path, default=KIT)
    parser.add_argument("--names", nargs="+", default=list(NOTEBOOKS), help="notebooks: which")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="live: which seeds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "notebooks":
        measure_notebooks(args.out, tuple(args.names))
    else:
        measure_live(args.out, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
