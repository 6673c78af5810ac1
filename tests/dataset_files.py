"""A hand-written dataset for the format tests: three images of different sizes
(`SIZES`, height x width) with two box-shaped objects each, written with json, PIL and
pycocotools directly rather than `DatasetWriter`, so the loader is checked against an
independent writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask


def box_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, y1, x1 = box
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle_json(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


# Three images (different sizes), two objects each: 6 samples.
SIZES = {"img0": (20, 30), "img1": (24, 16), "img2": (18, 18)}  # (height, width)


def good_lines() -> list[dict]:
    lines = []
    for k, (image_id, (h, w)) in enumerate(SIZES.items()):
        objects = [
            {
                "object_id": str(j),
                "description": f"a thing number {j}",
                "mask": rle_json(box_mask(h, w, (2 + j * 5, 1, 5 + j * 5, 6 + k))),
                "attributes": {"n": str(j)},
            }
            for j in range(2)
        ]
        question = {
            "question": "What is it?",
            "options": ["a thing number 0", "x", "y", "z"],
            "answer": 0,
            "object_id": "0",
        }
        lines.append(
            {
                "image_id": image_id,
                "file": f"images/{image_id}.png",
                "width": w,
                "height": h,
                "caption": "two things",
                "split": ["trace", "train", "test"][k],
                "objects": objects,
                "questions": [question],
            }
        )
    return lines


def write_dataset(root: Path, lines: list[dict | str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id, (h, w) in SIZES.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(root / "images" / f"{image_id}.png")
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    (root / "annotations.jsonl").write_text(text)
    return root
