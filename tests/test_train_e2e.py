"""End to end with the bundled SmolLM2-135M on a small real repo (slow: ~2-4 min on 2 cores)."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _real_repo_dataset(out: Path) -> Path:
    """Top-level functions/classes of an installed pure-Python package (click), split by file."""
    import click

    src = Path(click.__file__).parent
    files = sorted(src.glob("*.py"))
    random.Random(0).shuffle(files)
    out.mkdir(parents=True)
    splits = {"valid": files[:2], "train": files[2:]}
    for split, part in splits.items():
        recs = []
        for p in part:
            text = p.read_text()
            lines = text.splitlines(keepends=True)
            for node in ast.parse(text).body:
                if isinstance(node, ast.FunctionDef | ast.ClassDef):
                    recs.append({"text": "".join(lines[node.lineno - 1 : node.end_lineno]),
                                 "meta": {"kind": "continuation", "path": p.name, "changed": True}})
        (out / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:60]) + "\n")
    (out / "manifest.json").write_text(json.dumps({"repo": "click"}))
    return out


@pytest.mark.slow
def test_smollm2_few_steps_lower_heldout_loss(tmp_path, monkeypatch):
    pytest.importorskip("click")
    monkeypatch.setenv("FORGED_HOME", str(tmp_path / "home"))
    from forged.common.config import TrainConfig
    from forged.worker.train import load_model, train

    ds = _real_repo_dataset(tmp_path / "ds")
    cfg = TrainConfig(backend="torch", method="pissa", seq_len=256, batch_size=2, max_steps=24, warmup_steps=2,
                      learning_rate=2e-4, max_minutes=10, checkpoint_every=12)
    res = train(ds, tmp_path / "out", cfg)
    assert res.steps == 24
    assert res.heldout_loss < res.heldout_loss_start - 0.02, (res.heldout_loss_start, res.heldout_loss)
    be = load_model(cfg, res.adapter_dir)
    out = be.generate("def add(a, b):\n", max_new_tokens=12)
    assert isinstance(out, str) and out.strip()
