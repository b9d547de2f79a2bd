import torch

from pilamim.model.masking import gather_tokens, num_visible, patchify, random_mask, unpatchify


def test_mask_keeps_exact_count_and_restore_inverts_shuffle():
    noise = torch.rand(5, 49, generator=torch.Generator().manual_seed(0))
    keep = num_visible(49, 0.75)
    assert keep == 12
    m = random_mask(noise, keep)
    assert m.ids_keep.shape == (5, 12)
    assert torch.all(m.mask.sum(dim=1) == 49 - 12)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, m.ids_restore),
                       torch.arange(49).expand(5, 49))
    # visible positions are exactly the kept ones
    visible = torch.zeros(5, 49).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(visible, 1 - m.mask)


def test_masks_differ_per_sample():
    m = random_mask(torch.rand(4, 16), 4)
    assert len({tuple(r.tolist()) for r in m.ids_keep}) == 4


def test_patchify_roundtrip_and_order():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(img, 4)
    assert patches.shape == (2, 4, 48)
    assert torch.equal(unpatchify(patches, 4, 3), img)
    # patch 1 is the top-right 4x4 block (raster order)
    assert torch.equal(patches[0, 1].reshape(4, 4, 3).permute(2, 0, 1), img[0, :, :4, 4:])


def test_gather_tokens():
    x = torch.arange(24.0).reshape(1, 6, 4)
    out = gather_tokens(x, torch.tensor([[5, 0]]))
    assert torch.equal(out[0, 0], x[0, 5]) and torch.equal(out[0, 1], x[0, 0])
