"""``m2restore routing``: the expert-selection study of the paper's Fig. 8 (see :mod:`m2restore.routing`).

Outputs ``routing_tsne.png`` and ``routing.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..options import ROUTING_PERPLEXITY
from .common import (add_model_arguments, check_at_least, check_model_arguments, check_output, check_path, check_positive,
                     parse_set)

#: Images per degradation type in the paper's Fig. 8.
PAPER_PER_TYPE = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="[TYPE=]PATH",
                        help="degraded images per degradation type: folders (or their input/) or list files")
    parser.add_argument("--per-type", type=int, default=PAPER_PER_TYPE,
                        help=f"images sampled per type (paper: {PAPER_PER_TYPE})")
    parser.add_argument("--crop", type=int, default=None, help="centre-crop images to this size first")
    parser.add_argument("--perplexity", type=float, default=ROUTING_PERPLEXITY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("routing"), help="folder for the plot and JSON")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    sets = [parse_set(spec) for spec in args.data]
    for _, path in sets:
        check_path(path, "--data")
    check_at_least(args, per_type=1, crop=1)
    check_positive(args, "perplexity")
    check_output(args.out, "--out")
    check_model_arguments(args)

    from ..routing import analyse, routing_vectors, sample_images, save_study
    from .common import load_model_from_args

    jobs = sample_images(sets, args.per_type, args.seed)
    model, device = load_model_from_args(args)
    vectors = routing_vectors(model, [file for _, file in jobs], device, args.dtype, args.crop)
    result = analyse(vectors, [kind for kind, _ in jobs], args.seed, args.perplexity)
    plot_path, json_path = save_study(args.out, args.weights, jobs, vectors, result)
    print(f"silhouette (t-SNE): {result['silhouette']:.3f}  " + "  ".join(
        f"{k}: {v:.3f}" for k, v in result["silhouette_per_type"].items()))
    print(f"silhouette (routing vectors): {result['silhouette_vectors']:.3f}")
    print("distance within types {:.2f} ± {:.2f}, between types {:.2f} ± {:.2f}".format(
        *result["intra_distance"], *result["inter_distance"]))
    print(f"plot: {plot_path}  numbers: {json_path}")
    return 0
