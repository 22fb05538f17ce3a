"""Format detection, fitting a file to a model, clear refusals, safe unpickling and `vitlab convert`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import TINY_VIT, random_model
from vitlab import create_model
from vitlab.commands import convert
from vitlab.errors import VitlabError
from vitlab.models import ViTConfig, VisionTransformer, config_to_dict
from vitlab.models.layers import resample_position_embedding
from vitlab.weights import load_model, load_weights, save_weights

TINY = TINY_VIT



def logits(model: torch.nn.Module, config: ViTConfig = TINY) -> torch.Tensor:
    images = torch.randn(2, config.in_chans, *config.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(images)


def _with(config: ViTConfig, **changes) -> ViTConfig:
    return dataclasses.replace(config, **changes)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


def test_vitlab_format_carries_its_config(tmp_path):
    model = random_model()
    save_weights(model, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as reader:
        assert json.loads(reader.metadata()["vitlab_config"]) == config_to_dict(TINY)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == TINY and same_weights(loaded, model)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]  # atomic: no leftovers


def test_training_checkpoint_uses_only_model_prefix(tmp_path):
    model = random_model()
    tensors = {f"model/{key}": value for key, value in model.state_dict().items()}
    tensors["optim/state.0.exp_avg"] = torch.ones(3)
    tensors["ema/blocks.0.norm1.weight"] = torch.zeros(32)
    tensors["train/step"] = torch.tensor(7)
    metadata = {"vitlab_config": json.dumps(config_to_dict(TINY)), "step": "7"}
    save_file(tensors, tmp_path / "last.safetensors", metadata=metadata)
    assert same_weights(load_model(tmp_path / "last.safetensors"), model)
    assert same_weights(load_weights(VisionTransformer(TINY), tmp_path / "last.safetensors"), model)

    # A run directory: best wins over last; last is used when there is no best.
    assert same_weights(load_model(tmp_path), model)
    best = random_model(seed=1)
    save_file({f"model/{key}": value for key, value in best.state_dict().items()}, tmp_path / "best.safetensors",
              metadata=metadata)
    assert same_weights(load_model(tmp_path), best)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitlabError, match="best.safetensors or last.safetensors"):
        load_model(tmp_path / "empty")


def test_head_mismatch_needs_reset_head(tmp_path):
    save_weights(random_model(), tmp_path / "five.safetensors")
    other = VisionTransformer(_with(TINY, num_classes=3))
    with pytest.raises(VitlabError, match=r"five\.safetensors.*\(5, 32\).*\(3, 32\).*reset_head"):
        load_weights(other, tmp_path / "five.safetensors")
    with torch.no_grad():
        other.head.weight.fill_(1.0)
    load_weights(other, tmp_path / "five.safetensors", reset_head=True)
    assert other.head.weight.abs().sum() == 0 and other.head.bias.abs().sum() == 0
    assert torch.equal(other.blocks[1].mlp.fc2.weight, random_model().blocks[1].mlp.fc2.weight)
    # load_model with a new class count starts a new zero head.
    assert load_model(tmp_path / "five.safetensors", num_classes=2).head.weight.abs().sum() == 0


def test_pre_logits_mismatch(tmp_path):
    with_rep = _with(TINY, representation_size=16)
    save_weights(random_model(with_rep), tmp_path / "rep.npz", "npz")
    with pytest.raises(VitlabError, match="representation_size=16"):
        load_weights(VisionTransformer(TINY), tmp_path / "rep.npz")
    plain = load_weights(VisionTransformer(TINY), tmp_path / "rep.npz", reset_head=True)
    assert plain.head.weight.abs().sum() == 0


def test_weights_of_another_width_are_named_as_such(tmp_path):
    save_weights(random_model(), tmp_path / "narrow.safetensors")
    wide = VisionTransformer(_with(TINY, embed_dim=48, num_heads=2))
    with pytest.raises(VitlabError, match="head reads 32 features and the model's 48.*another width"):
        load_weights(wide, tmp_path / "narrow.safetensors", reset_head=True)  # a new head would not help
    # With pre-logits the head reads the representation, so its width says nothing about the model's.
    save_weights(random_model(_with(TINY, representation_size=16)), tmp_path / "rep16.safetensors")
    with pytest.raises(VitlabError, match=r"head does not match: checkpoint has head\.weight \(5, 16\)"):
        load_weights(VisionTransformer(_with(TINY, representation_size=8)), tmp_path / "rep16.safetensors")


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    state = random_model().state_dict()
    partial = {key: value for key, value in state.items() if key != "blocks.1.norm2.bias"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(VitlabError, match=r"partial\.safetensors.*1 missing: blocks\.1\.norm2\.bias \(32,\)"):
        load_model(tmp_path / "partial.safetensors", "vit-ti16", embed_dim=32, depth=2, num_heads=4, mlp_dim=64,
                   patch_size=8)
    model = load_weights(VisionTransformer(TINY), tmp_path / "partial.safetensors", strict=False)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])

    wider = random_model(_with(TINY, mlp_dim=48))
    save_weights(wider, tmp_path / "wider.safetensors")
    expected = (r"wider\.safetensors.*6 with different shapes: .*"
                r"blocks\.0\.mlp\.fc1\.weight file \(48, 32\) vs model \(64, 32\).* and 1 more")
    with pytest.raises(VitlabError, match=expected):
        load_weights(VisionTransformer(TINY), tmp_path / "wider.safetensors")

    extra = dict(state, **{"blocks.2.norm1.weight": torch.ones(32)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(VitlabError, match=r"1 unexpected: blocks\.2\.norm1\.weight \(32,\)"):
        load_weights(VisionTransformer(TINY), tmp_path / "extra.safetensors")


def test_timm_file_needs_model_name(tmp_path):
    save_weights(random_model(), tmp_path / "timm.safetensors", "timm")
    with pytest.raises(VitlabError, match=r"timm\.safetensors.*model_name"):
        load_model(tmp_path / "timm.safetensors")


def test_model_name_is_checked_against_a_file_that_records_its_config(tmp_path):
    save_weights(random_model(), tmp_path / "tiny.npz", "npz")
    with pytest.raises(VitlabError, match=r"tiny\.npz does not hold a vit-b16: patch_size 8 \(file\) vs 16"):
        load_model(tmp_path / "tiny.npz", "vit-b16")


def test_position_embedding_follows_model_resample_mode(tmp_path):
    save_weights(random_model(), tmp_path / "timm.safetensors", "timm")
    for mode in ("official", "bicubic"):
        bigger = VisionTransformer(_with(TINY, img_size=(48, 48), posemb_resample=mode))
        load_weights(bigger, tmp_path / "timm.safetensors")
        expected = resample_position_embedding(random_model().pos_embed, (6, 6), 1, (4, 4), mode)
        torch.testing.assert_close(bigger.pos_embed.detach(), expected)


class _Payload:
    """A pickle that would create a file when unpickled by anything that runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_malicious_pth_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"patch_embed.proj.weight": torch.zeros(1), "payload": _Payload(str(marker))}, handle)
    with pytest.raises(VitlabError, match=r"evil\.pth.*refused"):
        load_weights(VisionTransformer(TINY), path)
    with pytest.raises(VitlabError, match="refused"):
        load_model(path, "vit-ti16")
    assert not marker.exists()
    # The payload is live: an unrestricted unpickle does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()
    # A bare pickle (not even a torch zip) is refused too.
    bare = tmp_path / "bare.bin"
    bare.write_bytes(pickle.dumps(_Payload(str(tmp_path / "pwned2")), protocol=2))
    with pytest.raises(VitlabError, match="refused"):
        load_model(bare, "vit-ti16")
    assert not (tmp_path / "pwned2").exists()


def test_unknown_inputs_are_refused(tmp_path):
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(VitlabError, match=r"w\.onnx.*unknown weight format"):
        load_model(tmp_path / "w.onnx")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(VitlabError, match=r"foo\.safetensors.*neither timm nor Hugging Face"):
        load_model(tmp_path / "foo.safetensors", "vit-ti16")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(VitlabError, match="broken.safetensors"):
        load_model(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.npz")
    with pytest.raises(VitlabError, match="unknown weight format 'onnx'"):
        save_weights(random_model(), tmp_path / "x", "onnx")


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.run(args)


def test_convert_command(tmp_path, capsys):
    model = random_model()
    save_weights(model, tmp_path / "in.npz", "npz")
    assert run_convert(str(tmp_path / "in.npz"), str(tmp_path / "out.safetensors")) == 0
    assert "out.safetensors (vitlab)" in capsys.readouterr().out
    assert same_weights(load_model(tmp_path / "out.safetensors"), model)
    assert run_convert(str(tmp_path / "out.safetensors"), str(tmp_path / "hf_dir")) == 0
    assert (tmp_path / "hf_dir" / "config.json").is_file()
    assert run_convert(str(tmp_path / "hf_dir"), str(tmp_path / "t.safetensors"), "--to", "timm") == 0
    assert "cls_token" in load_file(tmp_path / "t.safetensors")
    with pytest.raises(VitlabError, match="model_name"):
        run_convert(str(tmp_path / "t.safetensors"), str(tmp_path / "back.npz"))
    assert run_convert(str(tmp_path / "in.npz"), str(tmp_path / "big.npz"), "--img-size", "48") == 0
    assert load_model(tmp_path / "big.npz").config.img_size == (48, 48)
    with pytest.raises(VitlabError, match="--to"):
        run_convert(str(tmp_path / "in.npz"), str(tmp_path / "out.pth"))

    save_weights(create_model("vit-ti16", num_classes=5), tmp_path / "ti.safetensors", "timm")
    assert run_convert(str(tmp_path / "ti.safetensors"), str(tmp_path / "ti.npz"), "--model", "vit-ti16") == 0
    # the .npz file is read as Google's code computes it, with the tanh GELU
    expected = dataclasses.replace(create_model("vit-ti16", num_classes=5).config, act="gelu_tanh")
    assert load_model(tmp_path / "ti.npz").config == expected


def test_hf_directory_variants(tmp_path):
    model = random_model()
    save_weights(model, tmp_path / "hf", "hf")
    hf_state = load_file(tmp_path / "hf" / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in hf_state  # 4.x names: both generations read them

    # pytorch_model.bin (read tensor-only) instead of safetensors.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(hf_state, bin_dir / "pytorch_model.bin")
    assert same_weights(load_model(bin_dir), model)

    # Sharded safetensors with an index.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    keys = sorted(hf_state)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{number + 1}-of-00002.safetensors"
        save_file({key: hf_state[key] for key in part}, shard_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_weights(load_model(shard_dir), model)
