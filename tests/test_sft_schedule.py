"""The reference's SFT schedules (scripts/chat_sft.py at HEAD)."""

from __future__ import annotations

import pytest

from nanochat_mlx.training.schedule import LRSchedule, muon_momentum


def test_default_lr_is_flat_for_the_first_half_then_falls_linearly_to_zero():
    lr = LRSchedule()
    assert [lr(p) for p in (0.0, 0.25, 0.5)] == [1.0, 1.0, 1.0]
    assert lr(0.75) == pytest.approx(0.5) and lr(1.0) == pytest.approx(0.0)


def test_warmup_rises_linearly_and_warmdown_ends_at_the_final_fraction():
    lr = LRSchedule(warmup_ratio=0.2, warmdown_ratio=0.4, final_lr_frac=0.1)
    assert lr(0.1) == pytest.approx(0.5) and lr(0.3) == 1.0
    assert lr(0.8) == pytest.approx(0.55) and lr(1.0) == pytest.approx(0.1)


def test_muon_momentum_ramps_from_085_to_095_over_300_steps():
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(1000) == pytest.approx(0.95)
