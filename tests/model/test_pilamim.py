import pytest
import torch

from pilamim.model import PRESETS, build_pilamim
from pilamim.model.losses import cls_mse, masked_mse
from pilamim.model.masking import patchify
from tests.conftest import micro_model_params


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_and_builds_only_its_branches(preset):
    w = PRESETS[preset]
    model = build_pilamim(micro_model_params(preset=preset), in_chans=3)
    assert (model.pixel_decoder is not None) == (w.pixel > 0)
    assert (model.latent_decoder is not None) == (w.latent > 0 or w.cls > 0)
    assert (model.target is not None) == (w.latent > 0 or w.cls > 0)
    out = model(torch.randn(3, 3, 16, 16))
    assert out.loss.ndim == 0 and out.loss.item() > 0
    assert out.mask.shape == (3, 16) and torch.all(out.mask.sum(1) == 12)
    if w.pixel:
        assert out.pred_pixels.shape == (3, 16, 4 * 4 * 3)
    else:
        assert out.loss_pixel is None and out.pred_pixels is None
    if not w.latent:
        assert out.loss_latent is None
    out.loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads)
    if model.target is not None:
        assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())


def test_loss_is_weighted_sum_of_terms():
    model = build_pilamim(micro_model_params(), in_chans=1)
    out = model(torch.randn(2, 1, 16, 16))
    assert torch.allclose(out.loss, out.loss_pixel + out.loss_latent + out.loss_cls)
    nocls = build_pilamim(micro_model_params(preset="pilamim_nocls"), in_chans=1)
    out = nocls(torch.randn(2, 1, 16, 16))
    assert torch.allclose(out.loss, out.loss_pixel + out.loss_latent)


def test_latent_weight_scales_the_latent_and_cls_terms_only():
    torch.manual_seed(0)
    model = build_pilamim(micro_model_params(latent_weight=0.25), in_chans=1)
    out = model(torch.randn(2, 1, 16, 16))
    assert torch.allclose(out.loss, out.loss_pixel + 0.25 * (out.loss_latent + out.loss_cls))
    mae = build_pilamim(micro_model_params(preset="mae", latent_weight=0.25), in_chans=1)
    out = mae(torch.randn(2, 1, 16, 16))
    assert torch.allclose(out.loss, out.loss_pixel)


def test_cls_weight_scales_the_cls_term_alone_on_top_of_latent_weight():
    torch.manual_seed(0)
    model = build_pilamim(micro_model_params(latent_weight=0.5, cls_weight=0.25), in_chans=1)
    out = model(torch.randn(2, 1, 16, 16))
    expected = out.loss_pixel + 0.5 * out.loss_latent + 0.125 * out.loss_cls
    assert torch.allclose(out.loss, expected)
    assert out.loss_cls > 0  # the term is still computed and logged, only weighted


def test_layer_norm_target_is_each_token_normalised_without_affine():
    torch.manual_seed(0)
    model = build_pilamim(micro_model_params(), in_chans=1)
    with torch.no_grad():  # a trained final norm has left (1, 0): make it so
        model.target.norm.weight.mul_(3.0)
        model.target.norm.bias.add_(0.5)
    images = torch.randn(3, 1, 16, 16)
    cls, patches = model.latent_targets(images)
    model.params = model.params.model_copy(update={"latent_target_norm": "layer_norm"})
    cls_n, patches_n = model.latent_targets(images)
    tokens = torch.cat([cls[:, None], patches], 1)
    expected = (tokens - tokens.mean(-1, keepdim=True)) / (
        tokens.var(-1, keepdim=True, correction=0) + 1e-5).sqrt()
    assert torch.allclose(torch.cat([cls_n[:, None], patches_n], 1), expected, atol=1e-5)
    assert not torch.allclose(patches_n, patches, atol=1e-2)


def test_losses_zero_for_perfect_prediction_positive_otherwise():
    target = torch.randn(2, 5, 7)
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 1, 1, 0]])
    assert masked_mse(target, target, mask).item() == 0.0
    off = target.clone()
    off[0, 1] += 5.0  # an unmasked patch: must not count
    assert masked_mse(off, target, mask).item() == 0.0
    off[0, 0] += 1.0  # a masked patch: counts, averaged over 5 masked patches x 7 dims
    assert masked_mse(off, target, mask).item() == pytest.approx(7 / 35)
    assert cls_mse(target[:, 0], target[:, 0]).item() == 0.0
    assert cls_mse(target[:, 0] + 1, target[:, 0]).item() == pytest.approx(1.0)


def test_pixel_loss_zero_when_decoder_predicts_the_image():
    model = build_pilamim(micro_model_params(preset="mae"), in_chans=1)
    images = torch.randn(2, 1, 16, 16)
    out = model(images)
    target = patchify(images, 4)
    assert masked_mse(target, target, out.mask).item() == 0.0
    assert out.loss_pixel.item() > 0


def test_target_token_p_is_patch_p():
    """With identity blocks, target token p is LayerNorm(embed(patch p) + pos p): raster order."""
    model = build_pilamim(micro_model_params(), in_chans=1)
    for blk in model.target.blocks:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    images = torch.randn(3, 1, 16, 16)
    _, patches = model.latent_targets(images)
    t = model.target
    weight = t.patch_embed.proj.weight.reshape(t.embed_dim, -1)
    pixels = images.unfold(2, 4, 4).unfold(3, 4, 4).reshape(3, 1, 16, 16).permute(0, 2, 1, 3)
    expected = t.norm(pixels.reshape(3, 16, -1) @ weight.T + t.patch_embed.proj.bias
                      + t.pos_embed[0])
    assert torch.allclose(patches, expected, atol=1e-5)
    # the official bug, kept as an option, breaks exactly this property
    model.params = model.params.model_copy(update={"target_token_order": "shuffled"})
    _, shuffled = model.latent_targets(images)
    assert not torch.allclose(shuffled, expected, atol=1e-3)


def test_target_init_copy_vs_independent():
    torch.manual_seed(0)
    copy = build_pilamim(micro_model_params(), in_chans=1)
    for a, b in zip(copy.encoder.parameters(), copy.target.parameters(), strict=True):
        assert torch.equal(a, b)
    indep = build_pilamim(micro_model_params(target_init="independent"), in_chans=1)
    assert not torch.equal(indep.encoder.pos_embed, indep.target.pos_embed)


def test_ema_update_is_exact():
    model = build_pilamim(micro_model_params(target_init="independent"), in_chans=1)
    before = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    model.update_target(0.9)
    for t0, o, t1 in zip(before, online, model.target.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o, atol=1e-7)
    model.update_target(1.0)
    for t1, t2 in zip([p.clone() for p in model.target.parameters()], model.target.parameters(),
                      strict=True):
        assert torch.equal(t1, t2)


def test_xavier_init_option_changes_linear_init():
    torch.manual_seed(0)
    a = build_pilamim(micro_model_params(init="xavier"), in_chans=1)
    assert torch.all(a.encoder.blocks[0].mlp.fc1.bias == 0)
    torch.manual_seed(0)
    b = build_pilamim(micro_model_params(init="torch"), in_chans=1)
    assert not torch.all(b.encoder.blocks[0].mlp.fc1.bias == 0)


def test_patch_embedding_as_matmul_equals_timm_conv():
    """The fast path (embed gathered pixels by a matmul) is the same function as timm's conv:
    the encoder's visible tokens, the target's full tokens, the loss and the gradients."""
    from pilamim.model.encoder import encode_full, encode_visible

    torch.manual_seed(0)
    model = build_pilamim(micro_model_params(), in_chans=3)
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    ids_keep = model.draw_mask(noise).ids_keep
    fast = encode_visible(model.encoder, images, ids_keep, patch_matmul=True)
    conv = encode_visible(model.encoder, images, ids_keep, patch_matmul=False)
    torch.testing.assert_close(fast, conv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode_full(model.target, images),
                               model.target.forward_features(images), atol=1e-5, rtol=1e-5)

    def loss_and_grad(patch_matmul: bool):
        model.zero_grad()
        model.patch_matmul = patch_matmul
        loss = model(images, noise).loss
        loss.backward()
        return loss.detach(), model.encoder.patch_embed.proj.weight.grad.clone()

    (loss_fast, grad_fast), (loss_conv, grad_conv) = loss_and_grad(True), loss_and_grad(False)
    torch.testing.assert_close(loss_fast, loss_conv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_fast, grad_conv, atol=1e-6, rtol=1e-4)
