"""`ResumableCSVLogger`: Lightning's CSVLogger for runs that resume in the same folder.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so a resumed run would
lose every row of the run it continues. This one keeps the file and, when training starts,
drops only the rows that earlier runs logged at or after the step this run starts from (an
interrupted run's rows past its last checkpoint, logged again by the resumed run).
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


class _ResumableWriter(ExperimentWriter):
    """Appends to an existing metrics.csv (its header included) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._earlier_rows = 0  # rows at the top of the file that earlier runs wrote
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        header, rows = self._read()
        self.metrics_keys = sorted(header)
        self._earlier_rows = len(rows)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            return list(reader.fieldnames or []), list(reader)

    def drop_earlier_rows_from(self, step: int) -> None:
        self.save()
        if not self._earlier_rows:
            return
        header, rows = self._read()
        earlier = [r for r in rows[: self._earlier_rows] if r.get("step") and int(float(r["step"])) < step]
        rows = earlier + rows[self._earlier_rows :]
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(tmp, self.metrics_file_path)
        self._earlier_rows = len(earlier)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger (same arguments) that continues the `metrics.csv` of an earlier run in its folder.

    `resume_at_step(step)` (called by `TokenizerModule` when training starts) drops the earlier
    runs' rows logged at `step` or later; on a fresh start (`step` 0) that is all of them.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at_step(self, step: int) -> None:
        self.experiment.drop_earlier_rows_from(step)
