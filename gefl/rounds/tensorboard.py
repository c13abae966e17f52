"""Per-round scalars for TensorBoard (`--tensorboard DIR`, or the config key `tensorboard`).

The round loop hands every stored metrics record to its observers; this one writes the record's
numbers as TensorBoard scalars at step = round: accuracy per tier and the mean (evaluated rounds),
the mean training loss, bytes per client down and up, results counted, and for a `--devices` run
the simulated round time and the stragglers. `tensorboard --logdir DIR` shows them, several runs
side by side. The writer is torch's (torch.utils.tensorboard), which needs the `tensorboard`
package: an optional extra, imported only when asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gefl.errors import GeflError

log = logging.getLogger(__name__)


class TensorBoard:
    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise GeflError("--tensorboard needs the tensorboard package: pip install 'gefl-edge[tensorboard]'"
                            ) from exc
        self.log_dir = Path(log_dir)
        try:
            self.writer = SummaryWriter(str(self.log_dir))
        except OSError as exc:
            raise GeflError(f"cannot write TensorBoard events into {log_dir}: {exc.strerror}") from None
        log.info(f"TensorBoard events in {self.log_dir}: tensorboard --logdir {self.log_dir}")

    def __call__(self, record: dict) -> None:
        step = record["round"]
        scalars = {"loss": record.get("loss"), "results": len(record.get("contributors", [])),
                   "simulated_round_s": record.get("simulated_s"),
                   "stragglers": len(record["stragglers"]) if "stragglers" in record else None}
        if "accuracy" in record:
            scalars["accuracy/mean"] = record["mean_accuracy"]
            scalars.update({f"accuracy/{tier}": acc for tier, acc in record["accuracy"].items()})
        for direction, artifacts in record.get("bytes", {}).items():
            scalars[f"bytes_per_client/{direction}"] = sum(artifacts.values())
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
