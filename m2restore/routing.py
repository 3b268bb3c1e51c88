"""``m2restore routing``: the expert-selection study of the paper's Fig. 8.

For every image, each DDER's dense gate weights (B, N, H_l, W_l) are averaged over pixels into
the share of routing mass each expert receives; the three levels' vectors are concatenated into
one routing vector (3N numbers). These vectors are embedded with t-SNE (PCA initialisation,
perplexity 30, lowered for small sets as t-SNE needs perplexity < number of images) and scored
with the silhouette per degradation type, on the embedding (the paper's number, 0.25) and on the
vectors themselves; also the mean Euclidean distance within and between types (paper: 1.27 ±
0.43 vs 1.78 ± 0.34). Outputs: ``routing_tsne.png`` and ``routing.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def routing_vector(model, x: torch.Tensor) -> np.ndarray:
    """x (1, 3, H, W) -> (Σ_levels N,) mean gate weight of every expert of every DDER."""
    _, aux = model(x, return_aux=True)
    return torch.cat([g.float().mean(dim=(2, 3))[0] for g in aux.routing]).cpu().numpy()


def analyse(vectors: np.ndarray, labels: list[str], seed: int = 0, perplexity: float = 30.0) -> dict:
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


def _images_of(path: Path) -> list[Path]:
    """Degraded images of a set: a folder (its ``input/`` when it has one) or a list file."""
    from .data.datasets import allweather_pairs
    from .data.io import is_image_file

    if path.is_file():
        return [p.input for p in allweather_pairs(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"data not found: {path}")
    folder = path / "input" if (path / "input").is_dir() else path
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .restore import add_model_arguments

    parser.add_argument("--data", nargs="+", required=True, metavar="[TYPE=]PATH",
                        help="degraded images per degradation type: folders (or their input/) or list files")
    parser.add_argument("--per-type", type=int, default=50, help="images sampled per type (paper: 50)")
    parser.add_argument("--crop", type=int, default=None, help="centre-crop images to this size first")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("routing"), help="folder for the plot and JSON")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data.io import read_image
    from .evaluate import parse_set
    from .restore import autocast, default_device, load_model

    rng = np.random.default_rng(args.seed)
    jobs: list[tuple[str, Path]] = []
    for spec in args.data:
        kind, path = parse_set(spec)
        files = _images_of(path)
        if not files:
            raise ValueError(f"no images for type {kind!r} in {path}")
        picks = sorted(rng.choice(len(files), size=min(args.per_type, len(files)), replace=False))
        jobs += [(kind, files[i]) for i in picks]
    device = default_device(args.device)
    model = load_model(args.weights, device, args.backend, args.prior_checkpoint)
    vectors = []
    for _, file in tqdm(jobs, desc="routing", unit="img"):
        x = torch.from_numpy(read_image(file).rgb).permute(2, 0, 1)[None]
        if args.crop:
            top, left = max(0, (x.shape[2] - args.crop) // 2), max(0, (x.shape[3] - args.crop) // 2)
            x = x[:, :, top:top + args.crop, left:left + args.crop]
        with autocast(device, args.dtype):
            vectors.append(routing_vector(model, x.to(device)))
    labels = [kind for kind, _ in jobs]
    result = analyse(np.stack(vectors), labels, args.seed, args.perplexity)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"DDER routing, t-SNE (perplexity {result['perplexity']:.0f}); silhouette {result['silhouette']:.2f}"
    plot(np.array(result["embedding"]), labels, args.out / "routing_tsne.png", title)
    (args.out / "routing.json").write_text(json.dumps({
        "weights": str(args.weights), "images": [str(f) for _, f in jobs], "labels": labels,
        "vectors": np.stack(vectors).tolist(), **result}, indent=1))
    print(f"silhouette (t-SNE): {result['silhouette']:.3f}  " + "  ".join(
        f"{k}: {v:.3f}" for k, v in result["silhouette_per_type"].items()))
    print(f"silhouette (routing vectors): {result['silhouette_vectors']:.3f}")
    print("distance within types {:.2f} ± {:.2f}, between types {:.2f} ± {:.2f}".format(
        *result["intra_distance"], *result["inter_distance"]))
    print(f"plot: {args.out / 'routing_tsne.png'}  numbers: {args.out / 'routing.json'}")
    return 0
