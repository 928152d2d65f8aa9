"""The configuration files forged writes itself parse."""

from __future__ import annotations


def test_demo_config_parses_with_its_small_budget() -> None:
    from forged.common.config import parse
    from forged.daemon.demo import DEMO_CONFIG

    cfg = parse(DEMO_CONFIG.format(repo="/nonexistent", name="demo"), check_paths=False)
    assert cfg.train.max_steps == 40 and cfg.train.seq_len == 256
    # the judge stays within the demo's time: a cap on teacher-forced FIM, 64 generated middles
    assert cfg.judge.max_fim_bpb == 128 and cfg.judge.max_fim == 64


def test_demo_summary_waits_for_a_resting_stage_then_names_the_judged_metrics() -> None:
    from forged.daemon.demo import cycle_summary

    def status(stage: str, judge: list[str]) -> dict:
        repo = {"name": "demo", "cycle": {"stage": stage, "reason": "judged better"},
                "pending_approval": {"judge": judge}}
        return {"repos": [{"name": "other"}, repo]}

    assert cycle_summary(status("training", []), "demo", 12.0) is None
    text = cycle_summary(status("awaiting_approval", ["bpb 1.30→1.12 (−13.7%, 95% CI −15.6…−12.0%, n=24)"]),
                         "demo", 535.4)
    assert text is not None
    assert "ended at 'awaiting_approval' after 535s (judged better)" in text
    assert "  bpb 1.30→1.12 (−13.7%, 95% CI −15.6…−12.0%, n=24)" in text
    assert "forgectl approve demo" in text
