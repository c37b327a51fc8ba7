"""Input preprocessing shared by the cloud and devices, so both see exactly the same tensors.

Text goes through the `tokenizers` package with the bundle's tokenizer.json (no transformers);
images through Pillow + numpy as the manifest's InputSpec says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import InputSpec

_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


class TextEncoder:
    """Tokenize a batch of texts to int64 (batch, tokens) arrays padded to the batch's longest."""

    def __init__(self, tokenizer_file: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.max_length = max_length
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is None:
            pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else pad

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encs = self.tokenizer.encode_batch(list(texts))
        length = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), length), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ImagePreprocessor:
    """Load one image file to a float32 (channels, size, size) array, normalised as the FM expects."""

    def __init__(self, spec: InputSpec):
        if spec.image_size is None or spec.mean is None or spec.std is None:
            raise ValueError("image input spec needs image_size, mean and std")
        self.size = spec.image_size
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        self.rescale = np.float32(spec.rescale_factor)
        self.resample = _RESAMPLE[spec.resample]

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here, not later
            rgb = img.convert("RGB").resize((self.size, self.size), resample=self.resample)
        arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) * self.rescale  # (3, H, W)
        return (arr - self.mean) / self.std

    def batch(self, paths: list[Path]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.stack([self(p) for p in paths])}
