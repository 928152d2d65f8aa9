"""FIM in the base's own format: detection from the base, editor-like examples, one rendering
shared by the miner and the judge, special tokens as single ids, the gate."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("tree_sitter")

from forged.common import fim  # noqa: E402
from forged.common.config import JudgeConfig, MineConfig  # noqa: E402
from forged.worker.judge.gate import gate_decision  # noqa: E402
from forged.worker.judge.judge import JudgeError, bootstrap_ci, load_heldout  # noqa: E402
from forged.worker.mine import mine_repo  # noqa: E402
from forged.worker.mine.examples import FIM_MODES  # noqa: E402


def _module(i: int) -> str:
    body = "\n".join(f"        total_{k} = helper_{i}(n + {k}) * {k}  # step {k}" for k in range(12))
    return (f'"""Module {i}."""\n\nimport os\n\n\ndef helper_{i}(n: int) -> int:\n'
            f'    """Double n."""\n    return n * 2\n\n\nclass Engine{i}:\n'
            f'    def run_{i}(self, n: int) -> int:\n{body}\n        return total_0\n')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fimrepo")
    for i in range(30):
        p = root / "pkg" / f"mod_{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_module(i))
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@e.st", "-c", "user.name=T", "commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
    return root


def _mine(repo: Path, out: Path, fmt: fim.FimFormat, cache: Path | None = None) -> list[dict]:
    cfg = MineConfig(heldout_fraction=0.2)
    cfg.kinds.fim = 4.0
    cfg.kinds.raft = cfg.kinds.commit_diff = cfg.kinds.doc_to_code = cfg.kinds.code_to_doc = 0
    mine_repo(repo, out, cfg, cache or out.parent / "cache", linked=False, fim_format=fmt, context_tokens=512)
    recs = []
    for split in ("train", "valid"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["meta"]["kind"] == "fim":
                recs.append({**r, "split": split})
    return recs


def _parts(fmt: fim.FimFormat, rec: dict) -> tuple[str, str]:
    """The prefix and suffix a record was rendered from (its meta says where the prefix ends)."""
    parts = fmt.split(rec["prompt"], rec["meta"]["fim"]["prefix_chars"])
    assert parts is not None, rec["prompt"]
    return parts


@pytest.mark.parametrize("fmt", [fim.FORGED_TEXT, fim.QWEN, fim.STARCODER, fim.CODELLAMA],
                         ids=lambda f: f.name)
def test_examples_judge_and_render_are_the_same_bytes(repo: Path, tmp_path: Path, fmt: fim.FimFormat) -> None:
    recs = _mine(repo, tmp_path / "ds", fmt)
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["fim_format"] == fmt.to_dict()
    held = load_heldout(tmp_path / "ds", max_fim=1000)
    assert held.fim_format == fmt and len(held.fim_all) == sum(r["split"] == "valid" for r in recs) > 0
    judged = {ex.prompt: ex for ex in held.fim_all}
    for rec in recs:
        pre, suf = _parts(fmt, rec)
        mid = rec["completion"][: -len(fmt.stop[0])]
        head = f"# path: {rec['meta']['path']}\n"
        # prefix and suffix are the file's own text around the middle...
        assert pre.startswith(head) and pre[len(head):] + mid + suf in (repo / rec["meta"]["path"]).read_text()
        # ...and the mined prompt is their render
        assert rec["prompt"] == fmt.render(pre, suf)
        assert rec["completion"].endswith(fmt.stop[0])
        if rec["split"] == "valid":  # the judge's prompt is the render of the same prefix/suffix
            ex = judged[fmt.render(pre, suf)]
            assert ex.completion + ex.stop == rec["completion"] and ex.stop == fmt.stop[0]


def test_judge_refuses_a_dataset_rendered_in_another_format(repo: Path, tmp_path: Path) -> None:
    _mine(repo, tmp_path / "ds", fim.QWEN)
    manifest = tmp_path / "ds" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["fim_format"] = fim.STARCODER.to_dict()
    manifest.write_text(json.dumps(m))
    with pytest.raises(JudgeError, match="not in the starcoder format"):
        load_heldout(tmp_path / "ds")


def test_judge_refuses_a_dataset_mined_in_the_other_order(repo: Path, tmp_path: Path) -> None:
    """A forged-text dataset mined before the order became SPM is not judged as SPM."""
    _mine(repo, tmp_path / "ds", fim.FORGED_TEXT)
    manifest = tmp_path / "ds" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["fim_format"]["spm"] = False
    manifest.write_text(json.dumps(m))
    with pytest.raises(JudgeError, match="not in the forged-text format"):
        load_heldout(tmp_path / "ds")


@pytest.mark.parametrize("fmt", [fim.FORGED_TEXT, fim.QWEN, fim.CODELLAMA], ids=lambda f: f.name)
def test_split_inverts_render(fmt: fim.FimFormat) -> None:
    for pre, suf in [("", ""), ("def f(", ")\n"), ("a<fim_middle>b", "<fim_suffix>c"), ("x", ""), ("", "y")]:
        prompt = fmt.render(pre, suf)
        assert fmt.split(prompt, len(pre)) == (pre, suf)
    assert fmt.split(prompt, len(prompt) + 1) is None
    assert fmt.split("def f(x): return x", 3) is None


def test_forged_text_puts_the_prefix_right_before_the_middle() -> None:
    """SPM order for a base without FIM tokens: the middle continues the prefix's text."""
    assert fim.FORGED_TEXT.render("def f(x):\n    return ", "\n") == (
        "<fim_prefix><fim_suffix>\n<fim_middle>def f(x):\n    return ")
    assert fim.STARCODER.render("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    assert fim.FimFormat.from_dict(fim.FORGED_TEXT.to_dict()) == fim.FORGED_TEXT
    assert not fim.FimFormat.from_dict({**fim.FORGED_TEXT.to_dict(), "spm": None}).spm  # older manifests


def test_examples_look_like_editor_requests(repo: Path, tmp_path: Path) -> None:
    fmt = fim.QWEN
    recs = _mine(repo, tmp_path / "ds", fmt)
    modes = Counter(r["meta"]["fim"]["mode"] for r in recs)
    assert set(modes) == {m for m, _ in FIM_MODES}, modes
    n = sum(modes.values())
    assert modes["line"] / n > 0.35 and modes["lines"] / n > 0.25 and 0 < modes["empty"] / n < 0.15
    for r in recs:
        pre, suf = _parts(fmt, r)
        mid = r["completion"][: -len(fmt.stop[0])]
        mode = r["meta"]["fim"]["mode"]
        assert pre.startswith(f"# path: {r['meta']['path']}\n")  # the path as editors give it
        if mode in ("inline", "line"):
            assert "\n" not in mid and mid.strip()
        if mode == "line" or mode == "empty":
            assert suf.startswith("\n")  # the middle runs to the end of its line
        if mode == "lines":
            assert "\n" in mid
        if mode == "empty":
            assert mid == ""
        head = f"# path: {r['meta']['path']}\n"
        assert pre[len(head):] + mid + suf in (repo / r["meta"]["path"]).read_text()  # a slice of the file
        # the file around the cursor, not just the hidden span's chunk
        assert pre.count("\n") + suf.count("\n") >= 3
        assert len(r["prompt"]) < 512 * 4  # sized to the trainer's context


def test_a_change_of_format_remines(repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = _mine(repo, tmp_path / "a", fim.QWEN, cache)
    b = _mine(repo, tmp_path / "b", fim.STARCODER, cache)
    assert all(r["prompt"].startswith("<|fim_prefix|>") for r in a)
    assert all(r["prompt"].startswith("<fim_prefix>") for r in b)
    c = _mine(repo, tmp_path / "c", fim.FORGED_TEXT, cache)  # StarCoder's markers, SPM order
    assert all(r["prompt"].startswith("<fim_prefix><fim_suffix>") for r in c)


def test_formats_are_found_from_tiny_bases_of_each_family(tmp_path: Path) -> None:
    from tiny import make_tiny_family_gguf

    from forged.common.models import resolve_base

    got = {}
    for family in ("llama", "qwen2", "starcoder2"):
        b = resolve_base(str(make_tiny_family_gguf(tmp_path / family, family)))
        got[family] = fim.for_base(b.kind, b.path)
    assert got["qwen2"] == fim.QWEN  # from tokenizer.ggml.fim_*_token_id
    assert got["starcoder2"].name == "starcoder" and got["starcoder2"].special  # from the vocabulary
    assert got["llama"].name == "forged-text" and not got["llama"].special  # SmolLM2's vocabulary
    from tiny import tokenizer_dir

    assert fim.for_base("hf", tokenizer_dir()).name == "forged-text"


def test_special_tokens_are_single_ids_and_end_a_middle(tmp_path: Path) -> None:
    from tiny import make_tiny_family_gguf

    from forged.common.models import resolve_base
    from forged.worker.train.data import Record, completion_ids, encode, tokenize_record
    from forged.worker.train.models import load_tokenizer

    base = resolve_base(str(make_tiny_family_gguf(tmp_path, "qwen2")))
    tok = load_tokenizer(base)
    fmt = fim.for_base(base.kind, base.path)
    for marker in (*fmt.markers(), *fmt.stop):
        assert len(encode(tok, marker)) == 1, marker
    prompt = fmt.render("def f(x):\n    return ", "\n")
    ids = encode(tok, prompt)
    assert ids[0] == encode(tok, fmt.prefix)[0] and ids[-1] == encode(tok, fmt.middle)[0]
    p, c = completion_ids(tok, prompt, "x + 1" + fmt.stop[0])
    assert c[-1] == encode(tok, fmt.stop[0])[0] and c.count(c[-1]) == 1  # no EOS after the stop
    ex = tokenize_record(tok, Record("prompt", {"prompt": prompt, "completion": "x + 1" + fmt.stop[0]}), 0)
    assert ex.ids[-1] == encode(tok, fmt.stop[0])[0] and ex.mask[-1]
    _, plain = completion_ids(tok, "a", "b")
    assert plain[-1] == tok.eos_token_id  # other completions still end in EOS


def test_both_back_ends_encode_through_data_encode() -> None:
    """The MLX back end cannot run here (Apple silicon only); it must tokenize exactly as
    the torch one does, through ``data.encode`` (special-token strings → their ids)."""
    import ast

    src = Path(__file__).parents[1] / "forged" / "worker" / "train"
    for name in ("torch_backend.py", "mlx_backend.py"):
        tree = ast.parse((src / name).read_text())
        fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        calls = {c.func.id for c in ast.walk(fns["encode"]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert calls == {"encode"}, name
        cnll = {c.func.id for c in ast.walk(fns["completion_nll"])
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert "completion_ids" in cnll, name


def test_gate_includes_fim_bits_per_byte_and_single_line_exact() -> None:
    cfg = JudgeConfig(min_bpb_gain=0.0, tolerance=0.02)
    base = {"bpb": 1.0, "fim_bpb": 2.0, "fim_exact_line": 0.5}
    ok, why = gate_decision(base, None, {"bpb": 0.9, "fim_bpb": 2.03, "fim_exact_line": 0.5}, cfg)
    assert ok, why
    ok, why = gate_decision(base, None, {"bpb": 0.9, "fim_bpb": 2.1, "fim_exact_line": 0.5}, cfg)
    assert not ok and "fim_bpb" in why[0]
    ok, why = gate_decision(base, None, {"bpb": 0.9, "fim_bpb": 1.0, "fim_exact_line": 0.4}, cfg)
    assert not ok and "fim_exact_line" in why[0]


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_n() -> None:
    small = bootstrap_ci([1.0, 0.0] * 10)
    big = bootstrap_ci([1.0, 0.0] * 500)
    assert small is not None and big is not None
    assert small[0] < 0.5 < small[1] and big[0] < 0.5 < big[1]
    assert big[1] - big[0] < (small[1] - small[0]) / 3
    ratio = bootstrap_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert ratio == [2.0, 2.0]
    assert bootstrap_ci([]) is None


@pytest.mark.parametrize("arch, permuted", [("llama", True), ("qwen2", False), ("starcoder2", False)])
def test_export_permutes_qk_rows_for_the_llama_family_only(arch: str, permuted: bool) -> None:
    import numpy as np

    from forged.worker.judge.export import BaseInfo, LoraPair, gguf_oriented

    rng = np.random.default_rng(0)
    pairs = [LoraPair(0, m, rng.normal(size=(2, 8)), rng.normal(size=(8, 2)), 1.0) for m in ("q_proj", "c_fc")]
    base = BaseInfo(arch, 2, 2, {"blk.0.attn_q.weight": (8, 8), "blk.0.ffn_up.weight": (8, 8)})
    out, did = gguf_oriented(pairs, {"layout": "hf"}, base)
    assert did == permuted
    assert np.array_equal(out[0].b, pairs[0].b) != permuted  # q rows moved only when permuted
    assert np.array_equal(out[1].b, pairs[1].b) and out[1].gguf_name == "blk.0.ffn_up.weight"
