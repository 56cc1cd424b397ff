"""Command line: `python -m gxpo_lib <command>`.

    run --preset P [-s NAME=VALUE ...] --out DIR [--fit]   one training run (validated, memory preflight:
                                     --fit lowers micro_batch_size to fit; run_summary.json, figures)
    preflight --preset P [-s NAME=VALUE ...] [--gpu h100|h200|a100-80|a100-40|l4|GiB] [--fit]   the run's
                                     estimated peak GPU memory, line by line (gxpo_lib.rl.preflight)
    run-notebooks [--out runs]       execute every notebook headless with its defaults (+ HTML copies)
    strip-notebooks [folder]         remove outputs from the stored notebooks
    sweep GRID.yaml [--parallel N] [--gpus 0,1] [--dry-run]   run a grid of notebook-03 runs, skipping
                                     finished ones, each run its own process (CUDA_VISIBLE_DEVICES per slot)
    doctor [--no-train]              check this machine for a workshop: versions, kernel, widgets, a timed step
    execute NOTEBOOK OUT_DIR [--parameters FILE.json] [--timeout S]   one notebook headless into OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gxpo_lib.teach import headless


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="one training run (python -m gxpo_lib run --help)", add_help=False)
    commands.add_parser("preflight", help="estimated peak GPU memory (python -m gxpo_lib preflight --help)",
                        add_help=False)
    run = commands.add_parser("run-notebooks", help="execute every notebook headless into a folder")
    run.add_argument("--out", default="runs")
    run.add_argument("--notebooks", default=str(headless.NOTEBOOK_DIR))
    run.add_argument("--only", nargs="*", default=None, help="notebook file names to run (default: all)")
    strip = commands.add_parser("strip-notebooks", help="remove outputs from stored notebooks")
    strip.add_argument("folder", nargs="?", default=str(headless.NOTEBOOK_DIR))
    sweep = commands.add_parser("sweep", help="run a grid of headless notebook-03 runs")
    sweep.add_argument("grid")
    sweep.add_argument("--parallel", type=int, default=None, help="runs at a time (overrides the file)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs without executing them")
    sweep.add_argument("--gpus", default=None, help="GPU per parallel run, e.g. 0,1,2,3 (or 0,1|2,3 per run)")
    sweep.add_argument("--direct", action="store_true", help="run each point as `run` (no notebook kernel)")
    execute = commands.add_parser("execute", help="execute one notebook headless (papermill) into a folder")
    execute.add_argument("notebook")
    execute.add_argument("out_dir")
    execute.add_argument("--parameters", default=None, help="a JSON file of parameters")
    execute.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    doctor = commands.add_parser("doctor", help="check the environment and estimate each notebook's minutes")
    doctor.add_argument("--no-train", action="store_true", help="skip the timed tiny training step")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["run"]:  # one training run: its own parser (gxpo_lib.experiment)
        from gxpo_lib.experiment import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["preflight"]:  # the memory preflight: its own parser (gxpo_lib.rl.preflight)
        from gxpo_lib.rl.preflight import main as preflight_main

        return preflight_main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from gxpo_lib.teach.doctor import format_report, run_doctor

        findings = run_doctor(train_step=not args.no_train)
        print(format_report(findings))
        return 1 if any(f.status == "fail" for f in findings) else 0
    if args.command == "execute":
        parameters = json.loads(Path(args.parameters).read_text(encoding="utf-8")) if args.parameters else {}
        print(f"[gxpo] wrote {headless.execute_notebook(args.notebook, args.out_dir, parameters, args.timeout)}")
        return 0

    if args.command == "sweep":
        from gxpo_lib.sweep import format_table, load_sweep, parse_gpus, run_sweep

        plan = load_sweep(args.grid)
        if args.gpus is not None:
            try:
                plan.gpus = parse_gpus(args.gpus)
            except ValueError as error:
                parser.error(str(error))
        plan.direct = plan.direct or args.direct
        if args.parallel is not None:
            if args.parallel < 1:
                parser.error(f"--parallel={args.parallel} is invalid: allowed an integer >= 1")
            plan.parallel = args.parallel
        rows = run_sweep(plan, dry_run=args.dry_run)
        print(format_table(rows))
        return 1 if any(r["state"] == "failed" for r in rows) else 0

    if args.command == "run-notebooks":
        rows = headless.run_all(args.out, args.notebooks, only=args.only)
        failed = [r for r in rows if not r["ok"]]
        for row in failed:
            print(f"[gxpo] {row['notebook']} failed: {row['error']}", file=sys.stderr)
        print(f"[gxpo] {len(rows) - len(failed)} of {len(rows)} notebooks ran; outputs in {args.out}/")
        return 1 if failed else 0
    changed = [p.name for p in headless.find_notebooks(args.folder) if headless.strip_outputs(p)]
    print(f"stripped: {', '.join(changed) or 'nothing to strip'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
