"""input_pipeline 'memory': where it applies, the very floats the PIL transforms give."""

from __future__ import annotations

import pytest
import torch

from pilamim.config import FinetuneParams
from pilamim.data.dataset import ManifestDataset
from pilamim.data.memory_split import MemorySplit, eval_dataset, memory_split
from pilamim.data.prepared import load_prepared
from pilamim.data.pretrain_input import pretrain_input
from pilamim.data.transforms import eval_transform, pretrain_transform
from pilamim.evaluate.features import make_loader
from pilamim.stages.finetune import finetune_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tiny_prepared):
    return load_prepared(tiny_prepared)


def _pil(prepared, split, transform) -> torch.Tensor:
    ds = ManifestDataset(prepared, split, transform)
    return torch.stack([ds[(i, 7)][0] for i in range(len(ds))])


def test_pretrain_memory_batches_equal_the_pil_transform_bit_for_bit(prepared):
    pil = _pil(prepared, "train", pretrain_transform(28, prepared.mean, prepared.std, (1.0, 1.0),
                                                     hflip=False))
    got = pretrain_input(prepared, "train", 28, (1.0, 1.0), False, "auto", CPU)
    assert isinstance(got.dataset, MemorySplit)
    loader = torch.utils.data.DataLoader(got.dataset, batch_size=64, collate_fn=got.collate_fn,
                                         sampler=[(i, 7) for i in range(len(got.dataset))])
    batches = [got.to_device(batch) for batch in loader]
    assert torch.equal(torch.cat(batches), pil)
    labels = torch.cat([batch[1] for batch in loader])
    assert labels.tolist() == ManifestDataset(prepared, "train").labels


def test_eval_dataset_is_in_memory_and_equal_below_64_px_only(prepared):
    ds = eval_dataset(prepared, "val", 28)
    assert isinstance(ds, MemorySplit)
    pil = _pil(prepared, "val", eval_transform(28, prepared.mean, prepared.std))
    batch, labels = next(iter(make_loader(ds, len(ds), CPU)))
    assert torch.equal(batch, pil) and torch.equal(ds[3][0], pil[3])
    assert labels.tolist() == ds.labels
    # Images that are not img_size square need the PIL resize: the PIL dataset is kept.
    assert isinstance(eval_dataset(prepared, "val", 16), ManifestDataset)


def test_seeded_flips_are_a_function_of_index_and_seed(prepared):
    source = ManifestDataset(prepared, "train")
    ds = memory_split(source, 28, prepared.mean, prepared.std, hflip=0.5)
    plain = memory_split(source, 28, prepared.mean, prepared.std)
    keys = [(i, 3) for i in range(len(ds))]
    first, again = ds.__getitems__(keys)[0], ds.__getitems__(list(reversed(keys)))[0].flip(0)
    assert torch.equal(first, again)  # order and batch do not matter
    flipped = [not torch.equal(first[i], plain[i][0]) for i in range(len(ds))]
    for i in range(len(ds)):
        assert torch.equal(first[i], plain[i][0].flip(-1) if flipped[i] else plain[i][0])
    assert 0.35 < sum(flipped) / len(ds) < 0.65
    other = ds.__getitems__([(i, 4) for i in range(len(ds))])[0]
    assert not torch.equal(first, other)


def test_finetune_train_split_flips_the_images_timm_would_give(prepared):
    params = FinetuneParams(device="cpu")
    ds = finetune_dataset(prepared, "train", 28, params, train=True)
    assert isinstance(ds, MemorySplit) and ds.hflip == 0.5
    pil = finetune_dataset(prepared, "train", 28, params.model_copy(update={"input_pipeline":
                                                                              "pil"}), train=True)
    assert isinstance(pil, ManifestDataset)
    torch.manual_seed(0)
    batch, _ = next(iter(make_loader(ds, len(ds), CPU, shuffle=False)))
    for i in range(0, len(ds), 7):
        timm_image = pil[i][0]  # timm's transform: a random flip of the whole image
        assert torch.equal(batch[i], timm_image) or torch.equal(batch[i], timm_image.flip(-1))
    evals = finetune_dataset(prepared, "val", 28, params, train=False)
    assert isinstance(evals, MemorySplit) and evals.hflip == 0.0


def test_memory_is_refused_with_the_fix_where_it_would_change_the_images(prepared):
    with pytest.raises(ValueError, match="input_pipeline: memory needs crop_scale"):
        pretrain_input(prepared, "train", 28, (0.2, 1.0), False, "memory", CPU)
    assert isinstance(pretrain_input(prepared, "train", 28, (0.2, 1.0), False, "auto",
                                     CPU).dataset, ManifestDataset)
    strong = FinetuneParams(device="cpu", regularisation="mae", input_pipeline="memory")
    with pytest.raises(ValueError, match="regularisation 'light'"):
        finetune_dataset(prepared, "train", 28, strong, train=True)
    source = ManifestDataset(prepared, "train")
    assert memory_split(source, 28, prepared.mean, prepared.std, max_bytes=100) is None
