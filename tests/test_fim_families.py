"""Code-model bases end to end on tiny random-weight GGUFs of each family (llama/SmolLM2's
vocabulary, qwen2, starcoder2): mine in the base's FIM format → train (torch) → judge the
FIM metrics → export → llama.cpp fidelity, with q/k permuted for llama only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from forged.common import fim  # noqa: E402
from forged.common.config import JudgeConfig, MineConfig, TrainConfig  # noqa: E402


def _repo(root: Path) -> Path:
    for i in range(24):
        p = root / "pkg" / f"mod_{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"        value_{k} = self.scale * {k} + {i}" for k in range(6))
        p.write_text(f"class Box{i}:\n    def __init__(self, scale):\n        self.scale = scale\n\n"
                     f"    def fill(self):\n{body}\n        return value_0\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@e.st", "-c", "user.name=T", "commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "starcoder2"])
def test_family_mine_train_judge_export(family: str, tmp_path: Path) -> None:
    from tiny import make_tiny_family_gguf

    from forged.common.models import resolve_base
    from forged.worker.judge.export import export_adapter
    from forged.worker.judge.fidelity import check_fidelity
    from forged.worker.judge.judge import judge
    from forged.worker.mine import mine_repo
    from forged.worker.train import train

    gguf = make_tiny_family_gguf(tmp_path / "base", family)
    base = resolve_base(str(gguf))
    fmt = fim.for_base(base.kind, base.path)
    assert fmt.special == (family != "llama")
    mcfg = MineConfig(heldout_fraction=0.25)
    mcfg.kinds.raft = mcfg.kinds.commit_diff = mcfg.kinds.doc_to_code = mcfg.kinds.code_to_doc = 0
    mcfg.kinds.fim = 3.0
    ds = tmp_path / "ds"
    mine_repo(_repo(tmp_path / "repo"), ds, mcfg, tmp_path / "cache", linked=False, fim_format=fmt,
              context_tokens=256)
    cfg = TrainConfig(backend="torch", base_model=str(gguf), method="lora", seq_len=256, batch_size=4,
                      max_steps=12, warmup_steps=1, learning_rate=3e-3, checkpoint_every=100)
    res = train(ds, tmp_path / "train", cfg)
    meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
    assert meta["fim_format"] == fmt.to_dict() and meta["architecture"] == family

    verdict = judge(ds, cfg, JudgeConfig(max_examples=8, max_generate=4, max_fim=8, tolerance=1.0,
                                         min_bpb_gain=0.0), res.adapter_dir)
    b, c = verdict.base, verdict.candidate
    assert c.n_fim_bpb > 8 and c.n_fim == 8 and c.fim_bpb_ci and c.fim_exact_ci
    assert c.fim_bpb < b.fim_bpb - 0.1, (b.fim_bpb, c.fim_bpb)  # it learnt something of the middles

    exported = export_adapter(res.adapter_dir, gguf, tmp_path / "adapter.gguf")
    assert exported.permuted_qk == (family == "llama")  # llama.cpp permutes q/k for llama only
    texts = [json.loads(x)["text"] for x in (ds / "valid.jsonl").read_text().splitlines()
             if "text" in json.loads(x)][:4]
    fid = check_fidelity(res.adapter_dir, exported.path, gguf, cfg, texts)
    assert fid.passed, fid.reason
