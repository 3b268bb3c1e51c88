"""``m2restore routing``: routing vectors, t-SNE and cluster scores (paper Fig. 8)."""
import json

import numpy as np
import pytest
import torch

from m2restore import M2Restore, M2RestoreConfig, NullPrior
from m2restore.cli import main
from m2restore.data.io import ImageData, write_image
from m2restore.routing import analyse, routing_vector

pytestmark = pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")


def _tiny_model():
    torch.manual_seed(0)
    cfg = M2RestoreConfig.tiny(backend="torch")
    return M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim)).eval()


def test_routing_vector_is_each_levels_share_of_gate_mass():
    model = _tiny_model()
    v = routing_vector(model, torch.rand(1, 3, 24, 32))
    n = model.config.num_experts
    assert v.shape == (3 * n,) and (v >= 0).all()
    np.testing.assert_allclose(v.reshape(3, n).sum(axis=1), 1.0, rtol=1e-5)  # top-K softmax per pixel


def test_scores_separate_clustered_from_mixed_vectors():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 18) * 2.0
    labels = [k for k in ("rain", "snow", "raindrop") for _ in range(12)]
    vectors = np.concatenate([c + 0.1 * rng.standard_normal((12, 18)) for c in centres])
    clustered = analyse(vectors, labels)
    assert clustered["perplexity"] == pytest.approx(35 / 3)  # lowered below 30 for 36 images
    assert clustered["silhouette"] > 0.5 and min(clustered["silhouette_per_type"].values()) > 0.5
    assert clustered["silhouette_vectors"] > 0.7  # ≈ 1 − 0.6/2.9: noise spread vs. centre distance
    assert clustered["intra_distance"][0] < clustered["inter_distance"][0]
    mixed = analyse(vectors, list(rng.permutation(labels)))
    assert mixed["silhouette_vectors"] < 0.1
    with pytest.raises(ValueError, match="two degradation types"):
        analyse(vectors[:4], ["rain"] * 4)


def test_routing_cli_writes_plot_and_numbers(tmp_path, capsys):
    _tiny_model().save_pretrained(tmp_path / "w")
    rng = np.random.default_rng(0)
    for kind in ("rain", "snow"):
        for i in range(5):
            write_image(tmp_path / kind / f"{i}.png", ImageData(rng.random((20, 28, 3)).astype(np.float32)))
    assert main(["routing", "--weights", str(tmp_path / "w"), "--backend", "torch", "--per-type", "4",
                 "--data", f"rain={tmp_path / 'rain'}", f"snow={tmp_path / 'snow'}", "--out", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert result["labels"] == ["rain"] * 4 + ["snow"] * 4
    assert np.array(result["vectors"]).shape == (8, 18) and np.array(result["embedding"]).shape == (8, 2)
    assert set(result["silhouette_per_type"]) == {"rain", "snow"}
    assert (tmp_path / "r" / "routing_tsne.png").read_bytes()[:4] == b"\x89PNG"
    assert "silhouette" in capsys.readouterr().out
