"""`dpokit report RUN_DIR`: one self-contained HTML page that says whether a run went wrong, and where.

    from dpokit.report import build_report
    path = build_report("runs/demo")            # -> runs/demo/report.html
    build_report("runs/demo", out="demo.html")  # anywhere else

The page shows the run's verdict (healthy / warnings / stopped), the failure
detectors' diagnoses with what to do, the training and eval curves (inline SVG,
drawn here: no plotting dependency, no script, no network), the data summary and
the resolved config. A run directory with missing files or keys still gets a
report, with notes saying what is missing. Modules: run_data (reading), charts
(which curves), svg (drawing), page (HTML), style (CSS).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

from dpokit.report.page import render
from dpokit.report.run_data import RunData, load_run

__all__ = ["RunData", "build_report", "load_run", "render", "write_report"]


def build_report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html) and return its path.

    Raises FileNotFoundError only when `run_dir` is not a directory; every other gap is a note on the page.
    """
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run), encoding="utf-8")
    return path


def write_report(run_dir: Union[str, Path]) -> Optional[Path]:
    """`build_report` at the end of a run (`dpokit train`, `dpokit.train(...)`, `dpokit demo`), printing where it went.

    The report is a convenience: a bug in it must not turn a finished run into a failed one, so any
    error is one warning line on stderr (with the command to retry) and None.
    """
    try:
        path = build_report(run_dir)
    except Exception as e:  # noqa: BLE001
        print(
            f"[dpokit] warning: could not write the report ({type(e).__name__}: {e}); try `dpokit report {run_dir}`",
            file=sys.stderr,
            flush=True,
        )
        return None
    print(f"[dpokit] report: {path}", flush=True)
    return path
