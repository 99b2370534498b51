"""Loading real weights: Hugging Face folders (equal outputs), official state dicts, lvd exports, TorchScript, URLs."""

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lvd.embeddings.checkpoints import (
    CheckpointError,
    detect_format,
    fetch,
    load_backbone,
    load_hf_dinov2,
    save_lvd_backbone,
)
from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.vit import build_vit
from lvd.schemas.job_spec import ModelSpec

transformers = pytest.importorskip("transformers")  # a dev dependency, always installed here


def _perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Random weights everywhere (fresh inits leave zeros and ones that would hide mapping mistakes)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _hf_tokens(model, x):
    return model(pixel_values=x).last_hidden_state


def _our_tokens(model, x):
    o = model.forward_features(x)
    return torch.cat([o["x_norm_clstoken"][:, None], o["x_norm_regtokens"], o["x_norm_patchtokens"]], dim=1)


HF_CASES = {
    "mlp": ("Dinov2Model", "Dinov2Config", {}),
    "swiglu": ("Dinov2Model", "Dinov2Config", {"use_swiglu_ffn": True}),
    "registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 4}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hugging_face_folder_gives_the_same_outputs_as_transformers(tmp_path, case):
    model_cls, config_cls, extra = HF_CASES[case]
    config = getattr(transformers, config_cls)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14, **extra
    )
    hf = _perturbed(getattr(transformers, model_cls)(config))
    hf.save_pretrained(tmp_path)
    ours = load_backbone(tmp_path).eval()  # format auto-detected from config.json
    assert ours.num_register_tokens == extra.get("num_register_tokens", 0)
    torch.manual_seed(1)
    for h, w in ((56, 56), (28, 28), (84, 42)):  # native grid, then interpolated positions
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref, got = _hf_tokens(hf, x), _our_tokens(ours, x)
        assert ref.shape == got.shape
        assert ref.std() > 0.1  # a real signal, not a degenerate output
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_hf_mapping_is_not_vacuous(tmp_path):
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28
    )
    hf = _perturbed(transformers.Dinov2Model(config))
    hf.save_pretrained(tmp_path)
    ours = load_hf_dinov2(tmp_path)
    with torch.no_grad():
        ours.blocks[1].attn.qkv.weight[:8].mul_(-1)  # one wrong slice of the fused qkv must show
        x = torch.randn(1, 3, 28, 28)
        assert (_our_tokens(ours, x) - _hf_tokens(hf, x)).abs().max() > 1e-3


@pytest.fixture(scope="module")
def vit_tiny_regs():
    return _perturbed(build_vit("vit_tiny", img_size=42, num_register_tokens=4), 0.02)


def test_official_state_dict_round_trips(tmp_path, vit_tiny_regs):
    path = tmp_path / "dinov2_vitt14_reg4_pretrain.pth"
    torch.save(vit_tiny_regs.state_dict(), path)
    assert detect_format(path) == "dinov2"
    loaded = load_backbone(path, arch="vit_tiny").eval()
    assert (loaded.num_register_tokens, loaded.patch_embed.img_size) == (4, 42)
    for k, v in vit_tiny_regs.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit_tiny_regs(x), atol=0, rtol=0)


def test_a_wrong_key_fails_with_its_name(tmp_path, vit_tiny_regs):
    sd = dict(vit_tiny_regs.state_dict())
    sd["blocks.3.attn.qkv.weights"] = sd.pop("blocks.3.attn.qkv.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.weights") as err:
        load_backbone(tmp_path / "renamed.pth")
    assert "blocks.3.attn.qkv.weight'" in str(err.value)  # reported missing too

    sd = dict(vit_tiny_regs.state_dict())
    sd["blocks.7.mlp.fc2.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.7\.mlp\.fc2\.bias: checkpoint \(5,\)"):
        load_backbone(tmp_path / "shape.pth")

    with pytest.raises(CheckpointError, match="not a vit_small"):
        torch.save(vit_tiny_regs.state_dict(), tmp_path / "ok.pth")
        load_backbone(tmp_path / "ok.pth", arch="vit_small")


def test_lvd_export_round_trips(tmp_path, vit_tiny_regs):
    path = save_lvd_backbone(vit_tiny_regs, tmp_path / "teacher.pth")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "lvd-backbone" and raw["arch"] == "vit_tiny"
    assert (raw["patch_size"], raw["num_register_tokens"], raw["img_size"]) == (14, 4, 42)
    assert set(raw["state_dict"]) == set(vit_tiny_regs.state_dict())
    assert detect_format(path) == "lvd"
    loaded = load_backbone(path).eval()
    x = torch.randn(1, 3, 56, 56)  # interpolated positions behave the same too
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit_tiny_regs(x), atol=0, rtol=0)


def test_lvd_export_of_a_swiglu_small_without_layerscale(tmp_path):
    # Pretraining may pick ffn_layer and layerscale per run; the export must carry both through.
    model = _perturbed(build_vit("vit_tiny", img_size=28, ffn_layer="swiglu", layerscale_init=None), 0.02)
    loaded = load_backbone(save_lvd_backbone(model, tmp_path / "t.pth")).eval()
    assert loaded.ffn_layer == "swiglu" and "blocks.0.ls1.gamma" not in loaded.state_dict()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


class _CopyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_torchscript_copy_detection_model(tmp_path):
    torch.manual_seed(0)
    net = _CopyDetector().eval()
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(net).save(str(path))
    assert detect_format(path) == "torchscript"
    spec = ModelSpec(
        arch="torchscript", weights=str(path), image_size=32, resize_size=32, precision="float32"
    )
    model = load_embedding_model(spec, "cpu")
    assert model.dim == 12 and model.preprocess.crop_size == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
    ref = (ref / ref.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(model(x), ref, atol=1e-6)
    with pytest.raises(CheckpointError, match="TorchScript model, but the spec's arch is 'vit_small'"):
        load_embedding_model(ModelSpec(arch="vit_small", weights=str(path)), "cpu")


def test_embedding_model_gives_unit_cls_vectors(tmp_path, vit_tiny_regs):
    torch.save(vit_tiny_regs.state_dict(), tmp_path / "w.pth")
    # Native grid: official register checkpoints interpolate positions differently (antialiased, as dinov2 hub).
    spec = ModelSpec(
        arch="vit_tiny", weights=str(tmp_path / "w.pth"), image_size=42, resize_size=48, precision="float32"
    )
    model = load_embedding_model(spec, "cpu")
    x = torch.randn(4, 3, 42, 42)
    with torch.no_grad():
        cls = vit_tiny_regs(x)
    ref = (cls / cls.norm(dim=1, keepdim=True)).numpy()
    out = model(x)
    assert out.dtype == np.float32 and out.shape == (4, 192)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_url_is_downloaded_once_into_the_cache(tmp_path, vit_tiny_regs, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    torch.save(vit_tiny_regs.state_dict(), served / "dinov2_vitt14_pretrain.pth")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("LVD_CACHE", str(tmp_path / "cache"))
        url = f"http://127.0.0.1:{server.server_address[1]}/dinov2_vitt14_pretrain.pth"
        first = load_backbone(url)
        cached = fetch(url)
        second = load_backbone(url)
    finally:
        server.shutdown()
    assert hits == ["/dinov2_vitt14_pretrain.pth"]
    assert (
        cached.is_relative_to(tmp_path / "cache")
        and cached.read_bytes() == (served / cached.name).read_bytes()
    )
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v)


def test_missing_file_and_garbage_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_backbone(tmp_path / "junk.pth")


class _RunsCode:
    """Unpickling this calls `Path.touch` on the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _booby_trapped(tmp_path, payload_key: str = "teacher"):
    from lvd.training.train import CHECKPOINT_FORMAT

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"format": CHECKPOINT_FORMAT, payload_key: _RunsCode(str(marker))}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path):
    """Embedding weights, `lvd eval knn` backbones and pretraining resume all load with weights_only."""
    from lvd.training.knn_eval import load_eval_backbone
    from lvd.training.train import CheckpointRefused, load_checkpoint

    path, marker = _booby_trapped(tmp_path)
    with pytest.raises(CheckpointRefused, match="could run code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointRefused, match="evil.pth"):
        load_eval_backbone(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone(path)
    assert not marker.exists()
    # The same file unpickled without the guard does run its code: the test's payload is real.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_auto_precision_is_bf16_where_the_cpu_has_it(tmp_path, vit_tiny_regs):
    from lvd.embeddings.hardware import cpu_has_native_bf16

    torch.save(vit_tiny_regs.state_dict(), tmp_path / "w.pth")
    base = dict(arch="vit_tiny", weights=str(tmp_path / "w.pth"), image_size=42, resize_size=48)
    auto = load_embedding_model(ModelSpec(**base), "cpu")
    fp32 = load_embedding_model(ModelSpec(**base, precision="float32"), "cpu")
    bf16 = load_embedding_model(ModelSpec(**base, precision="bfloat16"), "cpu")
    assert auto.compute_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert fp32.compute_dtype is None and bf16.compute_dtype == torch.bfloat16
    # bf16: the blocks' matmul weights are cast once; norms stay float32 for their statistics.
    assert bf16.module.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert bf16.module.blocks[0].norm1.weight.dtype == torch.float32
    assert fp32.module.blocks[0].mlp.fc1.weight.dtype == torch.float32
    # The copy descriptor's hand-made features stay float32 under auto (bf16 flips copy decisions).
    assert load_embedding_model(ModelSpec(arch="copy_descriptor"), "cpu").compute_dtype is None
    x = torch.randn(4, 3, 42, 42)
    v32, v16 = fp32(x), bf16(x)
    assert not np.array_equal(v32, v16)  # bf16 really ran
    # Unit vectors: bf16 moves cosines by far less than any copy or cluster threshold's margin.
    assert (v32 * v16).sum(axis=1).min() > 0.99


def test_url_weights_are_checked_against_the_spec_sha256_before_loading(tmp_path, vit_tiny_regs, monkeypatch):
    import hashlib

    from lvd.embeddings import checkpoints

    served = tmp_path / "served"
    served.mkdir()
    torch.save(vit_tiny_regs.state_dict(), served / "w.pth")
    good = hashlib.sha256((served / "w.pth").read_bytes()).hexdigest()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    loads = []
    real_load = checkpoints._torch_load
    monkeypatch.setattr(checkpoints, "_torch_load", lambda p: loads.append(p) or real_load(p))
    monkeypatch.setenv("LVD_CACHE", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
        wrong = ModelSpec(arch="vit_tiny", weights=url, sha256="0" * 64, image_size=42, resize_size=48)
        with pytest.raises(CheckpointError, match=f"sha256 mismatch: the file has {good}, the spec's sha256"):
            load_embedding_model(wrong, "cpu")
        assert loads == [] and not list((tmp_path / "cache").rglob("w.pth"))  # never loaded, not cached
        right = wrong.model_copy(update={"sha256": good})
        assert load_embedding_model(right, "cpu").dim == vit_tiny_regs.embed_dim
        (cached,) = (tmp_path / "cache").rglob("w.pth")
        cached.write_bytes(b"tampered")  # a damaged cache copy is fetched again, not loaded
        assert load_embedding_model(right, "cpu").dim == vit_tiny_regs.embed_dim
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == good
    finally:
        server.shutdown()
    assert hits == ["/w.pth"] * 3
    # Local files are checked the same way.
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_backbone(served / "w.pth", sha256="1" * 64)
