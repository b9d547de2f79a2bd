"""Every way a user can get params wrong ends in one message naming file, key, value, rule."""

import subprocess
import sys

import pytest
import yaml

from pilamim.config import GROUPS, Params, ParamsError
from pilamim.params_files import dump_params, load_params


def _write(tmp_path, group, values):
    (tmp_path / f"{group}.yaml").write_text(yaml.safe_dump(values))
    return tmp_path


@pytest.fixture(autouse=True)
def _all_groups_default(tmp_path):
    """Every group file present, asking for the code's defaults (``{}``)."""
    for group in GROUPS:
        (tmp_path / f"{group}.yaml").write_text("{}\n")


def test_repo_params_and_preset_are_valid():
    assert load_params("params").model.preset == "pilamim"
    assert load_params("params/presets/imagenet-vit-b16").model.size == "base"


def test_empty_mappings_mean_defaults_and_roundtrip(tmp_path):
    params = load_params(tmp_path)
    assert params == Params()
    dump_params(params, tmp_path / "out")
    assert load_params(tmp_path / "out") == params


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    """It used to mean the code's defaults: 10 epochs where the deleted file said 4."""
    (tmp_path / "register.yaml").unlink()
    with pytest.raises(ParamsError, match=r"register\.yaml: no such file.*git checkout"):
        load_params(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pilamim.cli", "pretrain", "--params",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "register.yaml: no such file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "models").exists()


@pytest.mark.parametrize("group,values,expected", [
    ("pretrain", {"epohcs": 3}, ["pretrain.yaml", "unknown key 'epohcs'"]),
    ("pretrain", {"epochs": "many"}, ["pretrain.yaml", "'epochs'", "'many'", "integer"]),
    ("pretrain", {"epochs": 0}, ["'epochs'", "(got 0)", "greater than or equal to 1"]),
    ("model", {"preset": "mea"}, ["model.yaml", "'preset'", "'mea'", "'pilamim'"]),
    ("model", {"img_size": 30, "patch_size": 4}, ["model.yaml", "multiple of patch_size"]),
    ("data", {"bad_images": "ignore"}, ["data.yaml", "'bad_images'", "'skip' or 'fail'"]),
    ("data", {"val_fraction": 0.45, "test_fraction": 0.45}, ["leave training data"]),
    ("probe", {"warmup_epochs": 20, "epochs": 10}, ["probe.yaml", "exceeds epochs"]),
    ("finetune", {"layer_decay": 1.5}, ["finetune.yaml", "'layer_decay'", "1.5"]),
    ("pretrain", {"crop_scale": [0.9, 0.2]}, ["crop_scale"]),
])
def test_bad_values_name_file_key_value_and_rule(tmp_path, group, values, expected):
    _write(tmp_path, group, values)
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path)
    for text in expected:
        assert text in str(err.value)


def test_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "model.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path)
    (tmp_path / "model.yaml").write_text("preset: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path)


def test_overrides(tmp_path):
    params = load_params(tmp_path, ["pretrain.epochs=7", "pretrain.betas=[0.8, 0.9]"])
    assert params.pretrain.epochs == 7 and params.pretrain.betas == (0.8, 0.9)
    with pytest.raises(ParamsError, match="GROUP.KEY=VALUE"):
        load_params(tmp_path, ["epochs=7"])
    with pytest.raises(ParamsError, match="unknown group 'pretrian'"):
        load_params(tmp_path, ["pretrian.epochs=7"])
    with pytest.raises(ParamsError, match="unknown key 'epoch'"):
        load_params(tmp_path, ["pretrain.epoch=7"])
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope")


def test_cli_reports_bad_params_before_any_work(tmp_path):
    _write(tmp_path, "pretrain", {"epochs": -1})
    done = subprocess.run([sys.executable, "-m", "pilamim.cli", "pretrain", "--params",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "pretrain.yaml" in done.stderr and "'epochs'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "models").exists()


def test_cli_help_lists_params():
    done = subprocess.run([sys.executable, "-m", "pilamim.cli", "pretrain", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert "params/pretrain.yaml" in done.stdout and "warmup_epochs" in done.stdout
    assert "params/model.yaml" in done.stdout and "preset" in done.stdout


def test_empty_and_non_utf8_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "pretrain.yaml").write_text("")
    with pytest.raises(ParamsError, match=r"pretrain\.yaml: the file is empty"):
        load_params(tmp_path)
    (tmp_path / "pretrain.yaml").write_bytes("epochs: 3  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r"pretrain\.yaml: not UTF-8"):
        load_params(tmp_path)


@pytest.mark.parametrize("override,expected", [
    ("pretrain.epochs.x=1", "--set 'pretrain.epochs.x=1': pretrain.epochs is 10, not a group"),
    ("pretrain.betas.first=0.8", "pretrain.betas is [0.9, 0.95], not a group"),
    ("pretrain.epochs=many", "--set 'pretrain.epochs=many': key 'epochs'"),
    ("pretrain.warmup_epochs=50", "pretrain.yaml with --set 'pretrain.warmup_epochs=50'"),
])
def test_every_malformed_set_is_blamed_on_the_set(tmp_path, override, expected):
    (tmp_path / "pretrain.yaml").write_text("epochs: 10\nbetas: [0.9, 0.95]\n")
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path, [override])
    assert expected in str(err.value)


def test_the_code_defaults_are_the_shipped_params():
    """One source of defaults: `--help` shows what `pilamim run` uses, and a group file that
    asks for the code's defaults (`{}`) gets the shipped values."""
    assert load_params("params") == Params()


def test_the_imagenet_preset_is_the_paper_recipe_whatever_the_code_defaults():
    """The preset states every value it needs instead of inheriting the embedded default's."""
    p = load_params("params/presets/imagenet-vit-b16")
    assert (p.model.size, p.model.depth, p.model.img_size, p.model.patch_size) == (
        "base", None, 224, 16)
    assert (p.model.decoder_depth, p.model.decoder_width, p.model.decoder_heads) == (6, 384, 12)
    assert (p.pretrain.epochs, p.pretrain.batch_size, p.pretrain.hflip) == (800, 256, True)
    assert p.pretrain.knn_every_epochs == 0 and p.pretrain.base_lr == 1.5e-4
    assert (p.finetune.epochs, p.finetune.batch_size, p.finetune.base_lr,
            p.finetune.layer_decay) == (100, 128, 5e-4, 0.65)
