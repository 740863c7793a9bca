"""`dpokit doctor`: find what would make a DPO run go wrong, before spending compute on it.

    from dpokit.doctor import run_doctor, format_report
    report = run_doctor("data.jsonl", model="Qwen/Qwen2.5-0.5B-Instruct")
    print(format_report(report))      # table: check | verdict | numbers, then what to do
    report.to_json()                  # the same, for machines

Modules: text_checks (rows only), token_scan and token_checks (tokenizer), reference_checks
(reference model), report (results and the table), run (the order); thresholds: config.DoctorConfig (the `doctor:` section).
docs/diagnosis.md describes every check.
"""

from dpokit.doctor.report import CheckResult, DoctorReport, format_report
from dpokit.doctor.run import DEFAULT_SAMPLE_SIZE, run_doctor
from dpokit.config import DoctorConfig

__all__ = ["DEFAULT_SAMPLE_SIZE", "CheckResult", "DoctorReport", "DoctorConfig", "format_report", "run_doctor"]
