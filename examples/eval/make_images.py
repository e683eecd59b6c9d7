"""Rebuild examples/eval/images/ from DICOM test files shipped in pydicom / pydicom-data (no download).

These figures are held out: none of them is a figure of the bundled sample corpus (src/vital/sample.py), so
`decontaminate` (whose default eval set is this folder) finds nothing to remove from the sample.

    python examples/eval/make_images.py
"""
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

OUT = Path(__file__).parent / "images"
FIGURES = {"eval_mr_head.jpg": ("emri_small.dcm", 5), "eval_mr_small.jpg": ("MR_small.dcm", None),
           "eval_ct.jpg": ("eCT_Supplemental.dcm", 0)}


def grey(a: np.ndarray) -> Image.Image:
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return Image.fromarray((np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)).convert("RGB")


def main():
    OUT.mkdir(exist_ok=True)
    for name, (dicom, frame) in FIGURES.items():
        a = pydicom.dcmread(get_testdata_file(dicom)).pixel_array
        im = grey(a[frame] if frame is not None else a)
        if max(im.size) < 256:  # the small test files, enlarged so a processor sees more than a few patches
            im = im.resize((im.width * 4, im.height * 4), Image.BICUBIC)
        im.thumbnail((512, 512))
        im.save(OUT / name, quality=90)


if __name__ == "__main__":
    main()
