"""The configuration files forged writes itself parse."""

from __future__ import annotations


def test_demo_config_parses_with_its_small_budget() -> None:
    from forged.common.config import parse
    from forged.daemon.demo import DEMO_CONFIG

    cfg = parse(DEMO_CONFIG.format(repo="/nonexistent", name="demo"), check_paths=False)
    assert cfg.train.max_steps == 40 and cfg.train.seq_len == 256
    # the judge stays within the demo's time: a cap on teacher-forced FIM, 64 generated middles
    assert cfg.judge.max_fim_bpb == 128 and cfg.judge.max_fim == 64
