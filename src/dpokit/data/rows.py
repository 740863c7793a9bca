"""A data file's rows -> examples, where one bad row never sinks a run and none disappears uncounted.

Every loader (paired `layouts.load_preferences`, unpaired `unpaired.load_unpaired`, SFT
`sft_step.load_sft`) converts rows its own way but handles them alike: `convert_rows` reads the
rows, and a row its converter rejects with `RowSkip` is counted in the SkipReport by reason (or,
with ``strict=True``, raised as a DataError naming the file, row and field). `no_usable_rows_message`
words the error for a file with no usable row, and `cap_rows` applies data.max_rows.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from dpokit.data.loading import read_rows
from dpokit.data.records import DataError, SkipReport

Example = TypeVar("Example")


class RowSkip(Exception):
    """One row cannot be used; `reason` is a short category counted in the SkipReport."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def convert_rows(
    path: str,
    split: str,
    convert: Callable[[dict, str], tuple[str, Example]],
    strict: bool = False,
    max_rows: int | None = None,
) -> tuple[list[Example], SkipReport]:
    """Read every row of `path` (`split` for datasets) and convert it with `convert(row, where)`.

    `where` is "path:row", for the example's source. `convert` returns (layout name, example) and
    raises RowSkip for a row it cannot use. A skipped row is counted under its reason, with
    "path:row (field)" as an example; with `strict` it raises DataError(reason, path, row, field)
    instead. Used rows are counted per layout name. The examples come back in row order, possibly
    none: the caller raises its own "no usable rows" error (see `no_usable_rows_message`).

    With `max_rows` (data.max_rows), reading stops once that many rows are used: the rest of the file
    is not read or parsed (a trial on the first 100 rows of a 50 GB file takes seconds), and the report
    says where reading stopped instead of counting unread rows as dropped.
    """
    report = SkipReport()
    examples: list[Example] = []
    for row_number, row in read_rows(path, split):
        if max_rows is not None and report.rows_used >= max_rows:
            report.read_stopped_at = max_rows  # this row exists; it and the rest are not read
            break
        report.rows_read += 1
        where = f"{path}:{row_number}"
        try:
            layout, example = convert(row, where)
        except RowSkip as skip:
            if strict:
                raise DataError(skip.reason, path, row=row_number, field=skip.field) from None
            report.skip(skip.reason, f"{where} ({skip.field})" if skip.field else where)
            continue
        report.layouts[layout] += 1
        report.rows_used += 1
        examples.append(example)
    return examples, report


def no_usable_rows_message(report: SkipReport) -> str:
    """ "no usable rows: all N rows were skipped. Reasons: ..." with each reason's count and two example rows."""
    reasons = "; ".join(
        f"{reason} ({count} rows, e.g. {', '.join(report.examples[reason][:2])})"
        for reason, count in report.skipped.most_common()
    )
    return f"no usable rows: all {report.rows_read} rows were skipped. Reasons: {reasons}"


def cap_rows(examples: list[Example], report: SkipReport, path: str, max_rows: int | None) -> list[Example]:
    """The first `max_rows` examples (all if None); the rest are counted in `report` as skipped, not used."""
    if max_rows is None or len(examples) <= max_rows:
        return examples
    n_extra = len(examples) - max_rows
    report.skip(f"beyond data.max_rows={max_rows}", f"{path} (rows after {max_rows})", n_extra)
    report.rows_used -= n_extra
    return examples[:max_rows]
