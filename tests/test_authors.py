"""Checkpoints of the authors' public code -> our weights, and the authors() switches.

The checkpoints here are written by hand in the authors' key layout (their ``net/M2Restore.py``
and ``net/MOE_CLIPbias.py``: class ``MCDB`` = our DDER, ``MB`` = our MCDB, ``freN`` = our AFLBs
from the latent up) from a model of ours, so the conversion must give that model back.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from m2restore.authors import authors_config, convert_state_dict, strip_wrappers
from m2restore.cli import main
from m2restore.config import M2RestoreConfig
from m2restore.model import M2Restore
from m2restore.prior.null import NullPrior


def tiny_authors(**overrides) -> M2RestoreConfig:
    base = M2RestoreConfig.tiny()
    sizes = {f: getattr(base, f) for f in ("dim", "enc_blocks", "latent_blocks", "dec_blocks", "refinement_blocks",
                                            "prompt_hidden", "prompt_len", "prompt_dim")}
    return M2RestoreConfig.authors(**{**sizes, "backend": "torch", **overrides})


def make_model(config: M2RestoreConfig, seed: int = 0) -> M2Restore:
    torch.manual_seed(seed)
    model = M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim))
    with torch.no_grad():
        for p in model.parameters():  # nothing left at its constant init (a = 0, b = 1, norms 1 / 0)
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _put(out: dict, prefix: str, module: torch.nn.Module) -> None:
    for k, v in module.state_dict().items():
        out[f"{prefix}.{k}"] = v.clone()


def _norm(out: dict, prefix: str, norm) -> None:
    out[f"{prefix}.body.weight"] = norm.weight.detach().clone()
    out[f"{prefix}.body.bias"] = norm.bias.detach().clone()


def _block(out: dict, prefix: str, block) -> None:
    _norm(out, f"{prefix}.norm1", block.norm1)
    _put(out, f"{prefix}.attn", block.attn)
    _norm(out, f"{prefix}.norm2", block.norm2)
    _put(out, f"{prefix}.ffn", block.ffn)


def authors_state_dict(model: M2Restore) -> dict[str, torch.Tensor]:
    """The state dict the authors' M2Restore with these weights would save (no wrapper prefix)."""
    sd: dict[str, torch.Tensor] = {}
    tp = model.task_prompt
    sd["task_prompt.dictionary"] = tp.library.detach().clone()
    _put(sd, "task_prompt.CondNet", tp.convs)
    _put(sd, "task_prompt.lastOut", tp.weights)
    sd["patch_embed.proj.weight"] = model.patch_embed.weight.detach().clone()
    for level, enc in enumerate(model.encoder, 1):
        d = enc.dder
        _put(sd, f"mcdb{level}.fc", d.prompt_proj)
        sd[f"mcdb{level}.model.w_g"] = d.w_gate.detach().clone()
        sd[f"mcdb{level}.model.w_n"] = d.w_noise.detach().clone()
        sd[f"mcdb{level}.model.gate_boost"] = d.alpha.detach().clone()
        _put(sd, f"mcdb{level}.model.degra_proj", d.degradation_proj)
        for i in range(d.num_experts):  # nn.Linear stores (out, in)
            sd[f"mcdb{level}.model.el.{i}.fc1.weight"] = d.w1[i].detach().t().clone()
            sd[f"mcdb{level}.model.el.{i}.fc1.bias"] = d.b1[i].detach().clone()
            sd[f"mcdb{level}.model.el.{i}.fc2.weight"] = d.w2[i].detach().t().clone()
            sd[f"mcdb{level}.model.el.{i}.fc2.bias"] = d.b2[i].detach().clone()
        sd[f"mcdb{level}.model.mean"] = torch.tensor([0.0])
        sd[f"mcdb{level}.model.std"] = torch.tensor([1.0])
        for i, block in enumerate(enc.blocks):
            _block(sd, f"encoder_level{level}.{i}", block)
        _put(sd, f"down{level}_{level + 1}.body", enc.down)
    for i, mb in enumerate(model.latent):
        p = f"latent.{i}"
        _norm(sd, f"{p}.norm1", mb.norm1)
        _put(sd, f"{p}.ssm.norm", mb.mamba_norm_in)
        _put(sd, f"{p}.ssm.norm2", mb.mamba_norm_out)
        _put(sd, f"{p}.ssm.prompt_proj", mb.dgf.prompt_mlp)
        _put(sd, f"{p}.ssm.mamba", mb.mamba)
        _put(sd, f"{p}.ssm.conv_path.0", mb.dgf.dwconv)
        _put(sd, f"{p}.ssm.gate_net.0", mb.dgf.gate1)
        _put(sd, f"{p}.ssm.gate_net.2", mb.dgf.gate2)
        _norm(sd, f"{p}.norm2", mb.norm2)
        _put(sd, f"{p}.ffn", mb.ffn)
    for level, dec in enumerate(model.decoder, 1):
        fre, a = f"fre{4 - level}", dec.aflb  # fre1 sits on the latent (our level 3)
        sd[f"{fre}.conv.weight"] = torch.randn_like(a.image_conv.weight)  # unused by their forward
        sd[f"{fre}.conv1.weight"] = a.image_conv.weight.detach().clone()
        sd[f"{fre}.score_gen.weight"] = torch.randn(2, 2, 7, 7)
        sd[f"{fre}.score_gen.bias"] = torch.randn(2)
        sd[f"{fre}.para1"] = a.a.detach().clone()
        sd[f"{fre}.para2"] = a.b.detach().clone()
        _put(sd, f"{fre}.channel_cross_l", a.cross_high)  # their _l attends from the high part
        _put(sd, f"{fre}.channel_cross_h", a.cross_low)
        _put(sd, f"{fre}.channel_cross_agg", a.cross_agg)
        sd[f"{fre}.frequency_refine.SpatialGate.spatial.weight"] = a.refine.spatial_gate.conv.weight.detach().clone()
        _put(sd, f"{fre}.frequency_refine.ChannelGate.mlp", a.refine.channel_gate.mlp)
        _put(sd, f"{fre}.frequency_refine.proj", a.refine.proj)
        _put(sd, f"{fre}.rate_conv", a.rate_conv)
        _put(sd, f"up{level + 1}_{level}.body", dec.up)
        if level > 1:
            _put(sd, f"reduce_chan_level{level}", dec.reduce)
        for i, block in enumerate(dec.blocks):
            _block(sd, f"decoder_level{level}.{i}", block)
    for i, block in enumerate(model.refinement):
        _block(sd, f"refinement.{i}", block)
    _put(sd, "output", model.output)
    return sd


@pytest.fixture(scope="module")
def reference():
    model = make_model(tiny_authors())
    return model, authors_state_dict(model)


def test_authors_preset_sets_every_public_code_switch():
    c = M2RestoreConfig.authors()
    assert (c.combine, c.noise_mask, c.alpha, c.gate_weights_cnn) == ("logsumexp", False, "scalar", False)
    assert (c.aflb_box, c.balance_load, c.prior_preprocess) == ("adair", "smooth_clean", "bilinear")
    assert (c.dim, c.enc_blocks, c.latent_blocks, c.heads) == (48, (4, 6, 6), 8, (1, 2, 4))  # paper sizes
    d = M2RestoreConfig()
    assert (d.aflb_box, d.balance_load, d.prior_preprocess) == ("half", "smooth", "daclip")


def test_configs_saved_before_the_switches_keep_their_behaviour():
    old = {k: v for k, v in M2RestoreConfig.tiny().to_dict().items()
           if k not in ("aflb_box", "balance_load", "prior_preprocess")}
    loaded = M2RestoreConfig.from_dict(old)
    assert (loaded.aflb_box, loaded.balance_load, loaded.prior_preprocess) == ("half", "count", "daclip")
    from m2restore.restore import DEMO_WEIGHTS

    demo = json.loads((DEMO_WEIGHTS / "config.json").read_text())
    assert (demo["aflb_box"], demo["balance_load"], demo["prior_preprocess"]) == ("half", "count", "daclip")
    for field, bad in (("aflb_box", "quarter"), ("balance_load", "sum"), ("prior_preprocess", "bicubic")):
        with pytest.raises(ValueError, match=field):
            M2RestoreConfig(**{field: bad})


def test_config_is_read_off_the_checkpoint(reference):
    model, sd = reference
    assert authors_config(sd, backend="torch") == model.config
    paper_sizes = authors_config(sd, dim=48)  # overrides win
    assert paper_sizes.dim == 48 and paper_sizes.aflb_box == "adair"


def test_conversion_gives_back_the_weights_and_reports_the_rest(reference):
    model, sd = reference
    conv = convert_state_dict({"module.net." + k: v for k, v in sd.items()})
    own = model.state_dict()
    assert conv.state.keys() == own.keys()
    for k, v in own.items():
        assert torch.equal(conv.state[k], v), k
    # every checkpoint tensor is accounted for, once
    used = [k for keys in conv.sources.values() for k in keys]
    assert len(used) == len(set(used)) and set(used) | set(conv.dropped) == set(sd)
    assert sorted(conv.dropped) == sorted(
        [f"fre{i}.{n}" for i in (1, 2, 3) for n in ("conv.weight", "score_gen.weight", "score_gen.bias")]
        + [f"mcdb{i}.model.{n}" for i in (1, 2, 3) for n in ("mean", "std")])
    assert conv.sources["decoder.2.aflb.cross_high.q.weight"] == ("fre1.channel_cross_l.q.weight",)
    assert conv.sources["encoder.1.dder.w2"] == tuple(f"mcdb2.model.el.{i}.fc2.weight" for i in range(6))


def test_cli_round_trip_gives_identical_outputs(reference, tmp_path, capsys):
    model, sd = reference
    ckpt = tmp_path / "epoch=3.ckpt"
    extra = {"daclip.clip.logit_scale": torch.tensor(4.6)}  # their module also saves the frozen prior
    torch.save({"epoch": 3, "state_dict": {"net." + k: v for k, v in {**sd, **extra}.items()}}, ckpt)
    assert main(["convert-authors", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    assert "dropped 1: the frozen DA-CLIP prior" in report and "dropped 6: a convolution their forward" in report
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert M2RestoreConfig.from_dict(saved) == dataclasses.replace(model.config, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = M2Restore.from_pretrained(tmp_path / "out", backend="torch").eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 24, 32)
    prior = (torch.softmax(torch.randn(2, 6), -1), torch.randn(2, 512))
    with torch.no_grad():
        expected, aux = model(x, prior=prior, return_aux=True)
        got, got_aux = loaded(x, prior=prior, return_aux=True)
    assert torch.equal(got, expected) and torch.equal(got_aux.balance_loss, aux.balance_loss)
    assert all(torch.equal(a, b) for a, b in zip(got_aux.routing, aux.routing))


def _cli(tmp_path, state, *extra):
    ckpt = tmp_path / "in.pt"
    torch.save(state, ckpt)
    return main(["convert-authors", str(ckpt), "-o", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("mcdb2.model.w_n"), "checkpoint key mcdb2.model.w_n is missing"),
    (lambda sd: sd.update({"fre2.para1": torch.zeros(3, 1, 1)}), "checkpoint key fre2.para1 has shape (3, 1, 1)"),
    (lambda sd: sd.update({"mcdb1.model.extra": torch.zeros(1)}), "checkpoint key mcdb1.model.extra has no place"),
    (lambda sd: sd.pop("mcdb3.model.el.0.fc1.bias"), "checkpoint key mcdb3.model.el.0.fc1.bias is missing"),
    (lambda sd: sd.pop("patch_embed.proj.weight"), "checkpoint key patch_embed.proj.weight is missing"),
])
def test_cli_errors_name_the_key(reference, tmp_path, capsys, edit, message):
    sd = dict(reference[1])
    edit(sd)
    assert _cli(tmp_path, sd) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unreadable_files_and_usage(reference, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["convert-authors", str(bad), "-o", str(tmp_path / "o")]) == 1
    assert main(["convert-authors", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "o")]) == 2  # usage
    assert _cli(tmp_path, [1, 2]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("m2restore convert-authors: ") for line in lines)
    assert _cli(tmp_path, reference[1]) == 0
    assert _cli(tmp_path, reference[1]) == 2  # the folder holds a model now: needs --force
    assert _cli(tmp_path, reference[1], "--force", "--top-k", "3") == 0
    assert M2RestoreConfig.from_dict(json.loads((tmp_path / "out" / "config.json").read_text())).top_k == 3
    with pytest.raises(SystemExit) as exc:
        main(["convert-authors", str(bad)])  # no -o
    assert exc.value.code == 2


def test_strip_wrappers():
    t = torch.zeros(1)
    assert strip_wrappers({"module.net.a.b": t, "net.c": t, "d": t}).keys() == {"a.b", "c", "d"}
