"""The expert-selection study of the paper's Fig. 8 (``m2restore routing``).

For every image, each DDER's dense gate weights (B, N, H_l, W_l) are averaged over pixels into
the share of routing mass each expert receives; the three levels' vectors are concatenated into
one routing vector (3N numbers). These vectors are embedded with t-SNE (PCA initialisation,
perplexity 30, lowered for small sets as t-SNE needs perplexity < number of images) and scored
with the silhouette per degradation type, on the embedding (the paper's number, 0.25) and on the
vectors themselves; also the mean Euclidean distance within and between types (paper: 1.27 ±
0.43 vs 1.78 ± 0.34). Outputs: ``routing_tsne.png`` and ``routing.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .options import ROUTING_PERPLEXITY


@torch.no_grad()
def routing_vector(model, x: torch.Tensor) -> np.ndarray:
    """x (1, 3, H, W) -> (Σ_levels N,) mean gate weight of every expert of every DDER."""
    _, aux = model(x, return_aux=True)
    return torch.cat([g.float().mean(dim=(2, 3))[0] for g in aux.routing]).cpu().numpy()


def analyse(vectors: np.ndarray, labels: list[str], seed: int = 0, perplexity: float = ROUTING_PERPLEXITY) -> dict:
    """t-SNE embedding and cluster scores of routing vectors (n, d) with one label each."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import pairwise_distances, silhouette_samples

    n, kinds = len(vectors), sorted(set(labels))
    if len(kinds) < 2 or n <= len(kinds):
        raise ValueError(f"need at least two degradation types and more images than types; "
                         f"got {n} image(s) of {len(kinds)} type(s)")
    perplexity = min(perplexity, (n - 1) / 3.0)
    embedding = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(vectors)
    lab = np.array(labels)
    sil_emb, sil_vec = silhouette_samples(embedding, lab), silhouette_samples(vectors, lab)
    dist = pairwise_distances(vectors)
    same = lab[:, None] == lab[None, :]
    off_diag = ~np.eye(n, dtype=bool)
    intra, inter = dist[same & off_diag], dist[~same]
    return {
        "perplexity": perplexity,
        "embedding": embedding.tolist(),
        "silhouette": float(sil_emb.mean()),
        "silhouette_per_type": {k: float(sil_emb[lab == k].mean()) for k in kinds},
        "silhouette_vectors": float(sil_vec.mean()),
        "silhouette_vectors_per_type": {k: float(sil_vec[lab == k].mean()) for k in kinds},
        "intra_distance": [float(intra.mean()), float(intra.std())] if intra.size else [float("nan")] * 2,
        "inter_distance": [float(inter.mean()), float(inter.std())],
    }


def plot(embedding: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    lab = np.array(labels)
    for kind in sorted(set(labels)):
        pts = embedding[lab == kind]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, label=f"{kind} ({len(pts)})", alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def images_of(path: Path) -> list[Path]:
    """Degraded images of a set: a folder (its ``input/`` when it has one) or a list file."""
    from .data.datasets import allweather_pairs
    from .data.io import find_images

    if path.is_file():
        return [p.input for p in allweather_pairs(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"data not found: {path}")
    return find_images(path / "input" if (path / "input").is_dir() else path)


def sample_images(sets: list[tuple[str, Path]], per_type: int, seed: int = 0) -> list[tuple[str, Path]]:
    """(type, image file) of up to ``per_type`` images drawn without replacement from each
    (type, path) set, in file order within a type."""
    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, Path]] = []
    for kind, path in sets:
        files = images_of(path)
        if not files:
            raise ValueError(f"no images for type {kind!r} in {path}")
        picks = sorted(rng.choice(len(files), size=min(per_type, len(files)), replace=False))
        jobs += [(kind, files[i]) for i in picks]
    return jobs


def routing_vectors(model, files: list[Path], device: torch.device, precision: str = "fp32",
                    crop: int | None = None, progress: bool = True) -> np.ndarray:
    """(len(files), Σ_levels N) routing vectors of image files, each centre-cropped to
    ``crop × crop`` first when ``crop`` is given, the model run at ``precision``."""
    from tqdm import tqdm

    from .data.io import read_image
    from .restore import autocast

    vectors = []
    for file in tqdm(files, desc="routing", unit="img", disable=not progress):
        x = torch.from_numpy(read_image(file).rgb).permute(2, 0, 1)[None]
        if crop:
            top, left = max(0, (x.shape[2] - crop) // 2), max(0, (x.shape[3] - crop) // 2)
            x = x[:, :, top:top + crop, left:left + crop]
        with autocast(device, precision):
            vectors.append(routing_vector(model, x.to(device)))
    return np.stack(vectors)


def save_study(out: Path, weights: str | Path, jobs: list[tuple[str, Path]], vectors: np.ndarray,
               result: dict) -> tuple[Path, Path]:
    """The t-SNE plot ``out/routing_tsne.png`` and everything in ``out/routing.json``; returns both paths."""
    labels = [kind for kind, _ in jobs]
    out.mkdir(parents=True, exist_ok=True)
    title = f"DDER routing, t-SNE (perplexity {result['perplexity']:.0f}); silhouette {result['silhouette']:.2f}"
    plot_path, json_path = out / "routing_tsne.png", out / "routing.json"
    plot(np.array(result["embedding"]), labels, plot_path, title)
    json_path.write_text(json.dumps({
        "weights": str(weights), "images": [str(f) for _, f in jobs], "labels": labels,
        "vectors": vectors.tolist(), **result}, indent=1))
    return plot_path, json_path
