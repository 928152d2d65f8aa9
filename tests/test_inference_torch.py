"""PyTorch inference paths the judge uses: batched greedy generation and the merged adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from forged.common.config import TrainConfig  # noqa: E402
from forged.worker.train import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lora_fixtures import make_peft_adapter, tiny_hf  # noqa: E402

torch.set_num_threads(1)

PROMPTS = [
    "def add(a, b):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "import os\n",
    "# A long prompt so the batch is left-padded a lot\n" + "x = 1\n" * 40,
    "for i in range(10):\n",
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    base = tiny_hf()
    adapter = make_peft_adapter(base, tmp_path_factory.mktemp("adapter") / "a", rank=4, alpha=8.0)
    return load_model(TrainConfig(backend="torch", base_model=str(base)), adapter)


def test_batched_generation_equals_one_prompt_at_a_time(backend) -> None:
    budgets = [5, 12, 1, 9, 16]
    backend.set_adapter_enabled(True)
    batched = backend.generate_many(PROMPTS, budgets)
    single = [backend.generate_many([p], [n])[0] for p, n in zip(PROMPTS, budgets, strict=True)]
    assert batched == single
    for text, n in zip(batched, budgets, strict=True):
        assert len(backend.encode(text)) <= n  # each row keeps its own budget
    assert any(len(t) > 0 for t in batched)


def test_generation_stops_when_the_row_is_done(backend) -> None:
    backend.set_adapter_enabled(True)
    full = backend.generate_many(PROMPTS[:2], [24, 24])
    seen: list[str] = []

    def until(text: str) -> bool:
        seen.append(text)
        return len(text) >= 3

    cut = backend.generate_many(PROMPTS[:2], [24, 24], [until, None])
    assert cut[1] == full[1]  # the other row is not affected
    assert full[0].startswith(cut[0]) and len(cut[0]) >= 3
    assert len(backend.encode(cut[0])) < len(backend.encode(full[0]))  # it stopped early
    # until() saw the text as it grew and was not asked again once it said stop.
    assert sum(1 for t in seen if len(t) >= 3) == 1


def test_merged_adapter_matches_unmerged_and_disabling_restores_the_base(backend) -> None:
    text = "def mul(a, b):\n    return a * b\n"
    backend.set_adapter_enabled(False)
    base = backend.logits(text)
    backend.peft.base_model.enable_adapter_layers()  # the adapter on, not merged
    unmerged = backend.logits(text)
    backend.set_adapter_enabled(True)  # merged into the weights
    merged = backend.logits(text)
    assert any(getattr(m, "merged", False) for m in backend.peft.modules())
    assert np.abs(unmerged - base).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    backend.set_adapter_enabled(False)
    assert not any(getattr(m, "merged", False) for m in backend.peft.modules())
    np.testing.assert_allclose(backend.logits(text), base, atol=1e-4)
