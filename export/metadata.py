"""What an exported model says about itself, so inference needs nothing but the .onnx file.

The preprocessing that training used (channels, resize, mean and std) and the class names travel
as ONNX metadata properties under the `gefl.` prefix. A file without them was not made by
`gefl export`, and guessing its preprocessing would give confident wrong answers, so it is refused.
Torch-free on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gefl.errors import GeflError

PREFIX = "gefl."
FORMAT_VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ModelInfo:
    tier: str
    classes: list[str]
    channels: int
    input_size: int
    """The network's square input side; images are resized to it."""
    source_size: tuple[int, int]
    """(height, width) of the dataset's images; an image must have this size or `input_size`."""
    mean: list[float]
    std: list[float]
    dataset: str
    run_id: str
    precision: str
    """"fp32" or "int8"."""

    @property
    def mode(self) -> str:
        """The PIL image mode the network was trained on."""
        return "L" if self.channels == 1 else "RGB"

    def to_props(self) -> dict[str, str]:
        values = {
            "format_version": FORMAT_VERSION, "tier": self.tier, "classes": json.dumps(self.classes),
            "channels": str(self.channels), "input_size": str(self.input_size),
            "source_size": json.dumps(list(self.source_size)), "mean": json.dumps(self.mean),
            "std": json.dumps(self.std), "dataset": self.dataset, "run_id": self.run_id,
            "precision": self.precision,
        }
        return {PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], path: str | Path) -> ModelInfo:
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise GeflError(f"{path} has no gefl metadata (gefl.tier, gefl.classes, gefl.mean, ...): it was not "
                            "made by `gefl export`, so its preprocessing is unknown; export the run with "
                            "`gefl export RUN_DIR --out DIR`")
        if ours.get("format_version") != FORMAT_VERSION:
            raise GeflError(f"{path} has gefl metadata format {ours.get('format_version')!r}; this gefl reads "
                            f"format {FORMAT_VERSION!r}: re-export the model with this version")
        try:
            info = cls(
                tier=ours["tier"], classes=list(json.loads(ours["classes"])), channels=int(ours["channels"]),
                input_size=int(ours["input_size"]), source_size=tuple(json.loads(ours["source_size"])),
                mean=[float(v) for v in json.loads(ours["mean"])], std=[float(v) for v in json.loads(ours["std"])],
                dataset=ours["dataset"], run_id=ours["run_id"], precision=ours["precision"],
            )
        except KeyError as exc:
            raise GeflError(f"{path}: gefl metadata lacks the property {PREFIX}{exc.args[0]}; re-export the model") \
                from None
        except (ValueError, TypeError) as exc:
            raise GeflError(f"{path}: malformed gefl metadata ({exc}); re-export the model") from None
        if info.channels not in (1, 3) or len(info.mean) != info.channels or len(info.std) != info.channels:
            raise GeflError(f"{path}: gefl metadata is inconsistent: {info.channels} channels with mean {info.mean} "
                            f"and std {info.std}")
        return info
