"""A checkpoint's global batch is its recipe; how it was split over processes is not."""

import torch

from pilamim.train.batch_layout import (
    LAYOUT,
    comparable,
    layout,
    saved_layout,
    world_change,
    world_change_message,
)
from pilamim.train.checkpoint import recipe_key, stale_reason


def _meta(batch_size, accum_steps, world, **recipe):
    return {"model": {"depth": 2}, "in_chans": 1, "dataset_digest": "d",
            "global_batch": batch_size * accum_steps * world,
            "recipe": {"seed": 0, "lr": 1e-3, **recipe},
            LAYOUT: layout(batch_size, accum_steps, world)}


def _legacy(meta):
    """A checkpoint written before the layout: the split sat in the recipe."""
    lay = meta[LAYOUT]
    return {**{k: v for k, v in meta.items() if k != LAYOUT},
            "recipe": {**meta["recipe"], "batch_size": lay["batch_size"],
                       "accum_steps": lay["accum_steps"]}}


def test_the_same_global_batch_on_other_processes_is_the_same_recipe():
    on_two, on_one = _meta(4, 1, 2), _meta(8, 1, 1)
    assert stale_reason(on_two, on_one) is None
    assert recipe_key(on_two) == recipe_key(on_one)
    assert stale_reason(_legacy(on_two), on_one) is None  # old checkpoints still resume
    assert stale_reason(on_two, _meta(4, 1, 1)) == "global_batch: 8 -> 4"


def test_a_legacy_checkpoint_tells_its_layout():
    assert saved_layout(_legacy(_meta(4, 2, 2))) == layout(4, 2, 2)
    assert comparable(_legacy(_meta(4, 2, 2))) == comparable(_meta(16, 1, 1))


def test_a_world_change_is_found_and_the_fix_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 12, "meta": _legacy(_meta(4, 1, 2)), "model": {}}, path)
    here = _meta(4, 1, 1)
    found = world_change([path], here)
    assert found is not None and found[0] == path and found[1]["step"] == 12
    message = world_change_message(found[0], found[1], here)
    assert "step 12" in message and "2 process(es)" in message
    assert "pretrain.batch_size=8 or pretrain.accum_steps=2" in message
    # another per-process batch, another recipe, or the same world: not a world change
    assert world_change([path], _meta(2, 1, 1)) is None
    assert world_change([path], _meta(4, 1, 1, seed=1)) is None
    assert world_change([path], _meta(4, 1, 2)) is None


def test_an_option_added_at_its_neutral_value_keeps_older_checkpoints_resumable():
    from pilamim.config import ADDED_NEUTRAL, Params
    from pilamim.train.loop import _meta as run_meta

    params = Params()
    now = run_meta(params, 1, 256, "d", 1)
    before = {**now, "model": {k: v for k, v in now["model"].items()
                               if k not in ADDED_NEUTRAL["model"]}}
    assert stale_reason(before, now) is None and recipe_key(before) == recipe_key(now)
    weighted = params.model_copy(update={
        "model": params.model.model_copy(update={"latent_weight": 0.5})})
    assert "latent_weight" in stale_reason(now, run_meta(weighted, 1, 256, "d", 1))
