"""Presets (SPEC §4) and their place in the option order: defaults ← preset ← --config ← flags."""
import pytest

from shared.errors import UserError
from trainer.config import TrainConfig, resolve_train_config
from trainer.presets import PRESETS, apply_preset, preset_values

PAPER = {"": (0.944, 0.05), "0.8": (0.946, 0.075), "0.5": (0.9514, 0.1), "0.3": (0.9516, 0.1), "0": (0.9522, 0.1)}


def _params(**given):
    """What click passes for `train`: every option, None unless given."""
    keys = ["config_file", "resume_dir", "preset", "data", "format", "scribbles", "method", "epochs",
            "pretrain_epochs", "batch_size", "lr", "crop_size", "init", "backbone_weights", "out", "seed", "eps",
            "nu", "epochs_per_round", "schedule", "max_staleness", "solvers", "solver_resource", "shards",
            "shard_size", "num_workers", "use_gpu", "eval_every", "tr_weight", "potts_weight", "max_iter", "algorithm"]
    params = dict.fromkeys(keys)
    params.update(given)
    return params


@pytest.mark.parametrize("suffix", list(PAPER))
def test_paper_preset_per_length(suffix):
    cfg = apply_preset(TrainConfig(data="x", scribbles=suffix, method="grid-tr"), "paper")
    eps, lam = PAPER[suffix]
    assert (cfg.eps, cfg.solver.tr_weight) == (eps, lam)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.solver.potts_weight) == (60, 12, 7e-4, 100.0)
    assert (cfg.momentum, cfg.weight_decay, cfg.solver.max_iter, cfg.epochs_per_round) == (0.9, 5e-4, 5, 5)
    assert (cfg.crop_size, cfg.batch_average, cfg.schedule, cfg.pretrain_lr) == (513, True, "sync", 0.007)
    assert cfg.augmentation == "reference"
    cfg.validate()


def test_paper_preset_per_method_is_the_reference_recipe():
    """SPEC §4's table: base LR and regulariser weight per method, the weights converted
    from the reference's units once (trainer.methods)."""
    from trainer.methods import PAPER_DENSE_NU
    from trainer.permutohedral import krahenbuhl_factor

    recipe = {m: apply_preset(TrainConfig(data="x", method=m), "paper") for m in ("pce", "dense-gd", "grid-gd", "grid-tr")}
    assert {m: c.lr for m, c in recipe.items()} == {"pce": 0.007, "dense-gd": 0.007, "grid-gd": 7e-7, "grid-tr": 7e-4}
    assert recipe["grid-gd"].nu == 100.0 and recipe["pce"].nu is None
    assert recipe["dense-gd"].pretrain_epochs == 0 and recipe["grid-gd"].pretrain_epochs == 60  # backbone vs PCE-GD
    from trainer.loop import phases

    assert phases(recipe["dense-gd"]) == [("dense-gd", 60)] and phases(recipe["grid-gd"])[0] == ("pce", 60)
    assert recipe["dense-gd"].nu == PAPER_DENSE_NU == pytest.approx(2e-9 * krahenbuhl_factor(5))


def test_preset_length_spellings_and_unknown():
    assert preset_values("paper", "1")["eps"] == 0.944
    assert preset_values("paper", 0)["eps"] == 0.9522
    assert preset_values("paper", "0.50")["eps"] == 0.9514
    with pytest.raises(UserError, match="--preset"):
        preset_values("nope")
    with pytest.raises(UserError, match="scribble length"):
        preset_values("paper", "0.7")
    assert sorted(PRESETS) == ["paper"]


def test_apply_preset_keeps_explicit():
    cfg = TrainConfig(data="x", scribbles="0.5", epochs=3)
    cfg.solver.tr_weight = 0.3
    apply_preset(cfg, "paper", explicit={"epochs", "tr-weight"})
    assert (cfg.epochs, cfg.solver.tr_weight, cfg.eps, cfg.batch_size) == (3, 0.3, 0.9514, 12)


def test_a_solver_key_that_is_not_a_table_is_named(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("solver = 5\n")
    with pytest.raises(UserError, match=f"--config {toml}: key 'solver': expected a \\[solver\\] table, got int 5"):
        resolve_train_config(_params(config_file=str(toml), data="d"))


def test_resolve_without_preset_keeps_defaults():
    cfg = resolve_train_config(_params(data="d"))
    default = TrainConfig()
    assert (cfg.epochs, cfg.lr, cfg.eps, cfg.solver.tr_weight) == (default.epochs, default.lr, None, 0.1)


def test_resolve_order_defaults_preset_config_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('scribbles = "0.8"\nbatch-size = 6\n[solver]\npotts-weight = 50.0\n')
    cfg = resolve_train_config(_params(config_file=str(toml), preset="paper", data="d", lr=0.02, tr_weight=0.2,
                                         backbone_weights="w.pth"))
    assert cfg.scribbles == "0.8"
    assert cfg.eps == 0.946  # preset, at the config file's scribble length
    assert cfg.epochs == 60  # preset over the default
    assert cfg.batch_size == 6  # config file over the preset
    assert cfg.solver.potts_weight == 50.0  # config file's [solver] table over the preset
    assert cfg.lr == 0.02 and cfg.solver.tr_weight == 0.2  # flags over everything


def test_resolve_preset_follows_scribbles_flag():
    cfg = resolve_train_config(_params(preset="paper", data="d", scribbles="0", eps=0.9, init="pce.pt"))
    assert cfg.solver.tr_weight == 0.1 and cfg.eps == 0.9
    cfg = resolve_train_config(_params(preset="paper", data="d", backbone_weights="imagenet"))
    assert (cfg.eps, cfg.solver.tr_weight) == (0.944, 0.05)


def test_train_help_lists_preset():
    from click.testing import CliRunner

    from trainer.cli import cli

    out = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--preset" in out and "paper" in out
    bad = CliRunner().invoke(cli, ["train", "--preset", "nope", "--data", "x"])
    assert bad.exit_code != 0 and "--preset" in bad.output


def test_print_config_is_the_resolved_toml_and_round_trips(tmp_path):
    """`train --print-config` prints every option, preset and flags applied, as a TOML
    file that `--config` reads back to the same configuration; nothing is trained."""
    import tomllib

    from click.testing import CliRunner

    from shared.config import SolverConfig, to_dict
    from trainer.cli import cli

    args = ["train", "--data", str(tmp_path / "d"), "--method", "grid-tr", "--preset", "paper", "--scribbles", "0.5",
            "--tr-weight", "0.2", "--out", str(tmp_path / "run"), "--backbone-weights", "w.pth", "--print-config"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    printed = result.output
    values = tomllib.loads(printed)
    assert set(values) - {"solver"} <= set(to_dict(TrainConfig(data="x"))) and set(values["solver"]) == set(
        to_dict(SolverConfig()))
    assert values["batch_size"] == 12 and values["solver"]["tr_weight"] == 0.2 and values["arch"]
    (tmp_path / "run.toml").write_text(printed)
    again = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "run.toml"), "--print-config"])
    assert again.exit_code == 0 and again.output == printed
    assert not (tmp_path / "run").exists()
    for method, lr, nu in (("pce", 0.007, None), ("grid-gd", 7e-7, 100.0), ("grid-tr", 7e-4, None)):
        shown = CliRunner().invoke(cli, ["train", "--data", "d", "--format", "voc", "--preset", "paper", "--method",
                                         method, "--backbone-weights", "imagenet", "--print-config"])
        values = tomllib.loads(shown.output)
        assert (values["lr"], values.get("nu")) == (lr, nu), method  # each method's recipe
