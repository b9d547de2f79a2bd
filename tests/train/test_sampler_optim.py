import torch

from pilamim.model import build_pilamim
from pilamim.train.optim import param_groups
from pilamim.train.sampler import EpochSampler
from tests.conftest import micro_model_params


def test_sampler_shards_match_single_process_batches():
    single = [i for i, _ in _set(EpochSampler(23, seed=3), 1)]
    r0 = [i for i, _ in _set(EpochSampler(23, world=2, rank=0, seed=3), 1)]
    r1 = [i for i, _ in _set(EpochSampler(23, world=2, rank=1, seed=3), 1)]
    assert len(r0) == len(r1) == 11
    # global batch k of the single process = union of each rank's batch k
    for k in range(2):
        union = set(r0[4 * k: 4 * k + 4]) | set(r1[4 * k: 4 * k + 4])
        assert set(single[8 * k: 8 * k + 8]) == union


def test_sampler_resume_offset_and_seeds_depend_on_index_epoch_only():
    full = list(_set(EpochSampler(20, seed=1), 2))
    tail = list(_set(EpochSampler(20, seed=1), 2, start=7))
    assert tail == full[7:]
    other_epoch = dict(_set(EpochSampler(20, seed=1), 3))
    assert dict(full) != other_epoch  # new order and new augmentation seeds each epoch
    assert len(EpochSampler(20, seed=1)) == 20


def _set(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return sampler


def test_no_weight_decay_on_1d_params_and_tokens():
    model = build_pilamim(micro_model_params(), in_chans=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.cls_token" in skipped and "encoder.pos_embed" in skipped
    assert "pixel_decoder.mask_token" in skipped
    assert not any(n.startswith("target.") for n in skipped | {names[id(p)]
                                                                for p in decay["params"]})
    (everything,) = param_groups(model, 0.05, decay_all=True)
    assert len(everything["params"]) == len(decay["params"]) + len(no_decay["params"])
    assert torch.is_tensor(everything["params"][0])
