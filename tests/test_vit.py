"""The DINOv2 ViT: official key names, attention formula, position interpolation, masks, batch invariance."""

import pytest
import torch
import torch.nn.functional as F

from lvd.embeddings.layers import DropPath, attention
from lvd.embeddings.layers.attention import Attention, attention_reference
from lvd.embeddings.vit import ARCHS, build_vit


def _official_keys(depth: int, ffn: str, registers: bool) -> set[str]:
    """The key list of an official DINOv2 checkpoint (the layout of the released dinov2 weights)."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"} | ({"register_tokens"} if registers else set())
    mlp = ("mlp.fc1", "mlp.fc2") if ffn == "mlp" else ("mlp.w12", "mlp.w3")
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", *mlp):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("arch", ["vit_small", "vit_giant2"])
def test_state_dict_keys_and_shapes_match_official_checkpoints(arch):
    with torch.device("meta"):  # no memory for ViT-g's 1.1B parameters
        model = build_vit(arch, img_size=518, num_register_tokens=4)
    dim, depth, heads, ffn = ARCHS[arch]
    sd = model.state_dict()
    assert set(sd) == _official_keys(depth, ffn, registers=True)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, dim)
    assert sd["register_tokens"].shape == (1, 4, dim) and sd["mask_token"].shape == (1, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, 14, 14)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    if arch == "vit_giant2":
        # dinov2 "swiglufused": hidden = 2/3 * 4 * 1536 = 4096 (already a multiple of 8)
        assert sd["blocks.0.mlp.w12.weight"].shape == (2 * 4096, 1536)
        assert sd["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.1e9, rel=0.05)
    else:
        assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert (model.embed_dim, model.n_blocks, model.num_heads, model.patch_size) == (dim, depth, heads, 14)


def test_sdpa_attention_equals_the_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(48, 6)
    x = torch.randn(3, 17, 48)
    torch.testing.assert_close(attn(x), attention_reference(x, attn), atol=1e-5, rtol=1e-5)
    # bf16 training on CPU takes the explicit-matmul path: the same values to bf16 rounding, and
    # gradients flow.
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(xg)
    torch.testing.assert_close(out.float(), attention_reference(x, attn), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert xg.grad is not None and attn.qkv.weight.grad is not None


def test_bf16_inference_attention_on_cpu_equals_the_formula(monkeypatch):
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MIN_TOKENS", 1)
    torch.manual_seed(0)
    attn = Attention(48, 6)
    x = torch.randn(3, 17, 48)
    ref = attention_reference(x, attn)
    attn.to(torch.bfloat16)
    with torch.inference_mode():  # the batched-matmul path, image by image
        out = attn(x.to(torch.bfloat16))
        alone = attn(x[1:2].to(torch.bfloat16))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert torch.equal(out[1:2], alone)  # each image's attention sees only its own tokens


def test_bf16_branches_keep_norms_and_residuals_in_float32():
    torch.manual_seed(0)
    model = build_vit("vit_tiny_d4", img_size=28, layerscale_init=1.0).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        ref = model(x)
        model.cast_branches(torch.bfloat16)
        out = model(x)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm1.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.999


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", img_size=56, num_register_tokens=2).eval()
    with torch.no_grad():  # make tokens distinct so mistakes show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_outputs_shapes_for_global_and_local_crops(tiny):
    for side, n in ((56, 16), (98, 49), (28, 4)):
        with torch.no_grad():
            out = tiny.forward_features(torch.randn(2, 3, side, side))
        assert out["x_norm_clstoken"].shape == (2, 192)
        assert out["x_norm_regtokens"].shape == (2, 2, 192)
        assert out["x_norm_patchtokens"].shape == (2, n, 192)
        assert out["x_prenorm"].shape == (2, 1 + 2 + n, 192)
    with pytest.raises(ValueError, match="multiple of patch size"):
        tiny(torch.randn(1, 3, 50, 56))


def test_forward_is_the_normalised_cls_token_and_lists_give_lists(tiny):
    x, y = torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        cls = tiny(x)
        feats = tiny.forward_features([x, y])
        # LayerNorm by hand on the pre-norm CLS token.
        pre = feats[0]["x_prenorm"][:, 0]
        ref = (pre - pre.mean(-1, keepdim=True)) / torch.sqrt(
            pre.var(-1, unbiased=False, keepdim=True) + 1e-6
        )
        ref = ref * tiny.norm.weight + tiny.norm.bias
    torch.testing.assert_close(cls, feats[0]["x_norm_clstoken"])
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=1e-5)
    assert feats[1]["x_norm_patchtokens"].shape == (3, 4, 192)


def test_interpolated_positions_of_a_constant_embedding_stay_constant():
    model = build_vit("vit_tiny", img_size=56)
    with torch.no_grad():
        model.pos_embed.copy_(torch.arange(192.0).expand(1, 17, 192))
    for h, w in ((98, 98), (28, 42), (56, 56)):
        pos = model.interpolate_pos_encoding(h, w, torch.float32)
        assert pos.shape == (1, 1 + (h // 14) * (w // 14), 192)
        torch.testing.assert_close(pos, torch.arange(192.0).expand_as(pos), atol=1e-4, rtol=1e-5)


def test_fully_masked_images_give_identical_outputs(tiny):
    # Every patch replaced by the mask token: the image content no longer matters.
    masks = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        a = tiny.forward_features(torch.randn(2, 3, 56, 56), masks)
        b = tiny.forward_features(torch.randn(2, 3, 56, 56), masks)
        unmasked = tiny.forward_features(torch.randn(2, 3, 56, 56))
    torch.testing.assert_close(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
    assert not torch.allclose(a["x_norm_patchtokens"], unmasked["x_norm_patchtokens"], atol=1e-3)
    assert a["masks"] is masks


def test_same_image_same_vector_whatever_the_batch(tiny):
    torch.manual_seed(1)
    batch = torch.randn(7, 3, 56, 56)
    with torch.no_grad():
        alone = tiny(batch[3:4])
        for size in (2, 5, 7):
            full = tiny(torch.cat([batch[:size], batch[3:4]]))
            torch.testing.assert_close(full[-1:], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny(batch.flip(0))[3:4], alone, atol=1e-5, rtol=0)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    y = dp(torch.ones(4000, 3, 5))
    per_sample = y.reshape(4000, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_stochastic_depth_grows_linearly_and_training_differs_from_eval():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", img_size=28, drop_path_rate=0.3)
    rates = [
        blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in model.blocks
    ]
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])
    x = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        e1, e2 = model.eval()(x), model(x)
        t = model.train()(x)
    torch.testing.assert_close(e1, e2)
    assert not torch.allclose(t, e1)


def test_bad_arch_and_ffn_are_rejected():
    with pytest.raises(ValueError, match="vit_huge"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="geglu"):
        build_vit("vit_tiny", ffn_layer="geglu")


def test_mask_token_replaces_only_masked_patches(tiny):
    x = torch.randn(1, 3, 56, 56)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True
    tokens = tiny.prepare_tokens(x, masks)
    plain = tiny.prepare_tokens(x)
    r = 1 + tiny.num_register_tokens
    pos = tiny.interpolate_pos_encoding(56, 56, torch.float32)[0, 1:]
    torch.testing.assert_close(tokens[0, r + 5], tiny.mask_token[0] + pos[5])
    keep = [i for i in range(16) if i != 5]
    torch.testing.assert_close(tokens[0, [r + i for i in keep]], plain[0, [r + i for i in keep]])
    assert F.cosine_similarity(tokens[0, r + 5], plain[0, r + 5], dim=0) < 0.999
