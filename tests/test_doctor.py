"""The doctor: version ranges, the Jupyter kernel and widget checks, the estimates, the report and the CLI."""

from __future__ import annotations

import json

import pytest

from gxpo_lib.teach import doctor
from gxpo_lib.teach.headless import find_notebooks


def test_version_findings_in_range_outside_and_missing():
    ok = doctor.version_finding("torch", ">=2.5,<2.15")
    assert ok.status == "ok" and "2." in ok.detail and not ok.fix
    outside = doctor.version_finding("torch", "<1.0")
    assert outside.status == "warn" and "outside the tested range <1.0" in outside.detail
    assert outside.fix == "pip install 'torch<1.0' (other versions may work, but were not tested)"
    missing = doctor.version_finding("no-such-distribution-xyz", None)
    assert missing.status == "fail" and missing.detail == "not installed" and "make venv" in missing.fix


def test_declared_ranges_come_from_the_package_metadata():
    ranges = doctor._declared_ranges()
    assert ranges["transformers"] and ranges["math-verify"] and ranges["papermill"]
    assert all(dist in ranges for dist in doctor.PACKAGES)


def test_kernel_pointing_at_another_python_is_flagged(tmp_path, monkeypatch):
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": ["/elsewhere/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "Other", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the environment's own kernels
    finding = doctor.kernel_finding()
    assert finding.status == "warn" and "/elsewhere/bin/python" in finding.detail
    assert "ipykernel install --sys-prefix --name python3" in finding.fix
    absent = doctor.kernel_finding("no-such-kernel-xyz")
    assert absent.status == "fail" and "--name no-such-kernel-xyz" in absent.fix


def test_this_environments_kernel_and_extensions_are_found():
    assert doctor.kernel_finding().status == "ok"
    assert doctor.lab_extension_finding().status == "ok"


def test_missing_widget_extensions_name_the_fix(tmp_path):
    finding = doctor.lab_extension_finding([tmp_path])
    assert finding.status == "warn" and "ipywidgets" in finding.detail and "anywidget" in finding.detail
    assert "pip install" in finding.fix
    for name in doctor.LAB_EXTENSIONS:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "package.json").write_text("{}")
    assert doctor.lab_extension_finding([tmp_path]).status == "ok"


def test_estimates_scale_the_reference_minutes():
    assert doctor.estimate_minutes(doctor.REFERENCE_STEP_SECONDS) == pytest.approx(doctor.REFERENCE_MINUTES)
    doubled = doctor.estimate_minutes(2 * doctor.REFERENCE_STEP_SECONDS)
    assert doubled["03_full_scale_run"] == pytest.approx(2 * doctor.REFERENCE_MINUTES["03_full_scale_run"])
    assert set(doctor.REFERENCE_MINUTES) >= {p.stem for p in find_notebooks()}   # every notebook has a reference
    with pytest.raises(ValueError, match="^step_seconds=0"):
        doctor.estimate_minutes(0)


def test_report_without_training_and_the_cli(capsys):
    findings = doctor.run_doctor(train_step=False)
    names = [f.name for f in findings]
    assert names[:8] == ["python", *doctor.PACKAGES] and "jupyter kernel" in names
    assert all(f.status in doctor.STATUSES for f in findings)
    assert not [f for f in findings if f.status == "fail"]
    report = doctor.format_report([*findings, doctor.Finding("x", "warn", "broken", "do this")])
    assert "[WARN] x" in report and "fix: do this" in report and report.endswith("1 problem(s) above, each "
                                                                                  "with its fix")
    assert doctor.main(["--no-train"]) == 0
    assert "gxpo doctor: ready" in capsys.readouterr().out


@pytest.mark.slow
def test_the_timed_training_step_gives_estimates():
    findings = doctor.run_doctor()
    step = next(f for f in findings if f.name == "training step")
    assert step.status in ("ok", "warn") and "s per GRPO step of 8 prompts x 8" in step.detail
    estimates = [f for f in findings if f.name.startswith("notebook ")]
    assert [f.name for f in estimates] == [f"notebook {n}" for n in doctor.REFERENCE_MINUTES]
    assert all(f.status == "info" and " here (reference " in f.detail for f in estimates)


@pytest.mark.slow
def test_the_time_budget_stops_the_timed_run_after_one_step():
    timing = doctor.time_training_step(steps=5, budget_s=0.0)
    assert timing["steps_timed"] == 1 and timing["step_seconds"] > 0 and timing["cpu_seconds"] > 0
