"""Segment a folder of 2D images (radiographs) into mask PNGs; one bad image never stops the rest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
from tqdm.auto import tqdm

from ..errors import InputError
from ..io.images import list_images, read_grey, write_png
from ..preprocessing.intensity import normalise_intensity
from .segment import Segmenter

log = logging.getLogger(__name__)


@dataclass
class FolderReport:
    written: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)

    def summary_line(self) -> str:
        return f"segmented {self.written} images, skipped {self.skipped} with existing outputs, {len(self.failures)} failed"


def label_image(labels: np.ndarray, label_values: List[int]) -> np.ndarray:
    """Class indices -> the bundle's label values; a single structure is written as 0/255 for viewing."""
    values = np.array([0, 255] if len(label_values) == 2 else label_values)
    dtype = np.uint8 if values.max() < 256 else np.uint16
    return values[labels].astype(dtype)


def segment_image_folder(
    segmenter: Segmenter,
    input_dir: Path,
    output_dir: Path,
    probabilities: bool = False,
    uncertainty: bool = False,
    overwrite: bool = False,
) -> FolderReport:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(
            output_dir, "the output folder is the input folder; choose another so that no input can be overwritten"
        )
    bundle = segmenter.bundle
    report = FolderReport()
    for path in tqdm(list_images(input_dir), desc="segmenting", unit="image"):
        target = output_dir / f"{path.stem}.png"
        if target.exists() and not overwrite:
            report.skipped += 1
            continue
        try:
            image = normalise_intensity(read_grey(path), bundle.intensity)
            prediction = segmenter.predict(image[None])
        except (InputError, ValueError) as error:
            # Reported once, by the caller, from the report: one line per failed image.
            report.failures.append(str(error) if isinstance(error, InputError) else f"{path}: {error}")
            continue
        if probabilities:
            classes = [1] if bundle.num_classes == 2 else range(1, bundle.num_classes)
            for k in classes:
                suffix = "_prob" if bundle.num_classes == 2 else f"_prob_{bundle.class_names[k]}"
                write_png(
                    output_dir / f"{path.stem}{suffix}.png",
                    np.round(prediction.probabilities[0, k] * 255).astype(np.uint8),
                )
        if uncertainty:
            write_png(
                output_dir / f"{path.stem}_uncertainty.png",
                np.round(np.clip(prediction.uncertainty[0] * 510, 0, 255)).astype(np.uint8),
            )
        write_png(target, label_image(prediction.labels[0], bundle.label_values))  # last: marks the image done
        report.written += 1
    return report
