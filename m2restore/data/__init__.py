"""Data: image files (``io``), paired training/test sets (``datasets``) and the synthetic
weather degradations used by the demo (``synthetic``)."""
from .datasets import PairedImages, Pair, SyntheticPairs, allweather_pairs, open_pairs, paired_folder_pairs
from .io import ImageData, find_images, read_image, write_image
from .synthetic import DEGRADATIONS, degrade

__all__ = [
    "DEGRADATIONS", "ImageData", "Pair", "PairedImages", "SyntheticPairs", "allweather_pairs", "degrade",
    "find_images", "open_pairs", "paired_folder_pairs", "read_image", "write_image",
]
