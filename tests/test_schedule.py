"""Learning rates: the poly schedule (SPEC §4) and the default rate per phase."""
import pytest

from trainer.config import FINE_TUNE_LR, SCRATCH_LR, TrainConfig
from shared.errors import UserError
from trainer.engine import poly_lr
from trainer.loop import phases


def test_poly_lr_decays_from_the_base_rate():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert 0 < poly_lr(0.01, 99, 100) < poly_lr(0.01, 98, 100)


@pytest.mark.parametrize("method, init, pretrain_epochs, fine_tunes", [
    ("pce", None, 10, False),         # from scratch
    ("full", None, 10, False),
    ("pce", "pce.pt", 10, True),      # the same-budget control of Table 1
    ("grid-tr", "pce.pt", 10, True),  # Alg. 1 from a PCE model
    ("grid-tr", None, 10, True),      # after its own PCE pretraining
    ("dense-gd", None, 0, False),     # the paper's Dense-GD, from the backbone
])
def test_default_rate_is_a_tenth_when_the_method_fine_tunes(method, init, pretrain_epochs, fine_tunes):
    cfg = TrainConfig(data="d", method=method, init=init, pretrain_epochs=pretrain_epochs)
    cfg.validate()
    assert cfg.lr == (FINE_TUNE_LR if fine_tunes else SCRATCH_LR)
    assert FINE_TUNE_LR == pytest.approx(SCRATCH_LR / 10)  # the paper's ratio
    assert cfg.pretrain_lr == SCRATCH_LR  # PCE pretraining always trains from scratch
    assert (len(phases(cfg)) == 2) == (fine_tunes and not init)


def test_given_rates_are_kept():
    cfg = TrainConfig(data="d", method="grid-tr", init="pce.pt", lr=0.01, pretrain_lr=0.02)
    cfg.validate()
    assert (cfg.lr, cfg.pretrain_lr) == (0.01, 0.02)
    for bad in (0.0, -1.0):
        with pytest.raises(UserError, match="--lr"):
            TrainConfig(data="d", lr=bad).validate()
        with pytest.raises(UserError, match="--pretrain-lr"):
            TrainConfig(data="d", pretrain_lr=bad).validate()
