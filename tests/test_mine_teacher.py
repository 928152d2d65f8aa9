"""The miner's optional teacher, against the Ollama double (a real HTTP server running
llama.cpp on a tiny random-weight GGUF) through the real ``ollama`` client.

Most tests give the double a scripted reply (``chat_reply``) so acceptance, grounding,
rejection counts and secrets can be checked exactly; one lets the random model sample
under the JSON-schema grammar, the way Ollama's ``format`` works.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

pytest.importorskip("tree_sitter")

from ollama_double import OllamaDouble  # noqa: E402

from forged.common.config import MineConfig  # noqa: E402
from forged.daemon.publish import Publisher  # noqa: E402
from forged.worker.mine import mine_repo, teacher  # noqa: E402
from forged.worker.mine.chunker import Chunk  # noqa: E402
from tests.test_mine_pipeline import body, commit, git, module, read  # noqa: E402
from tests.test_mine_secrets import SECRETS, leaky_repo  # noqa: E402, F401 (a fixture)

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory):
    # Ollama's default context; the double's 512 is too small for a chunk + instructions.
    with OllamaDouble(tmp_path_factory.mktemp("ollama"), n_ctx=2048) as od:
        yield od


@pytest.fixture(scope="module")
def tag(double: OllamaDouble, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A teacher model in the double: the tiny random llama with SmolLM2's chat template."""
    from tests.tiny import make_tiny_gguf

    pub = Publisher(double.url)
    try:
        return pub.ensure_base(make_tiny_gguf(tmp_path_factory.mktemp("tiny")), "teacher-tiny")
    finally:
        pub.close()


@pytest.fixture
def od(double: OllamaDouble, tag: str):
    """Each test starts with an empty request log and no scripted reply, and leaves the
    double up."""
    double.requests.clear()
    double.chats.clear()
    double.chat_reply = None
    yield double
    double.down = False
    double.chat_reply = None


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    files: dict[str, str | bytes] = {f"pkg/mod{i}.py": module(i) for i in range(6)}
    files["web/app.js"] = ("export function bootServer(cfg) {\n  const port = cfg.port + 1;\n"
                           "  return startOn(port);\n}\n")
    files["README.md"] = "# Demo\n\nThe demo repo, with `helper_1` and friends.\n"
    commit(r, files, "Initial import")
    return r


def cfg(model: str = "", weight: float = 1.0, **kw: Any) -> MineConfig:
    c = MineConfig(**{"chunk_tokens": 64, "workers": 1, "heldout_fraction": 0.34, "teacher": model,
                      **kw})
    c.kinds.teacher = weight
    return c


def user_of(req: dict[str, Any]) -> str:
    return req["messages"][-1]["content"]


def path_of(req: dict[str, Any]) -> str:
    return re.search(r"File `([^`]+)`", user_of(req)).group(1)


def grounded(req: dict[str, Any]) -> str:
    """A teacher that names something the chunk defines (or a distinctive identifier)."""
    code = user_of(req).split("```", 2)[1]
    names = (re.findall(r"(?:def|class|function)\s+(\w+)", code)
             or re.findall(r"\b[A-Za-z]+_\w+\b", code) or ["nothing"])
    return json.dumps({"question": f"What does `{names[0]}` do in {path_of(req)}?",
                       "answer": f"`{names[0]}` is defined in `{path_of(req)}`; see its body."})


def teacher_recs(out: Path, name: str) -> list[dict]:
    return [r for r in read(out, name) if r["meta"]["kind"] == "teacher"]


# ---------------------------------------------------------------- off / on


def test_off_by_default_makes_no_call(od: OllamaDouble, tag: str, repo: Path, tmp_path: Path) -> None:
    assert MineConfig().teacher == "" and MineConfig().kinds.teacher > 0
    rep = mine_repo(repo, tmp_path / "o", cfg(), tmp_path / "cache", ollama_host=od.url)
    assert od.requests == [] and rep.teacher == {"status": "off"}
    assert "teacher" not in rep.by_kind["train"] and "teacher" not in rep.durations
    # A model named but the kind weighted 0: still off.
    rep = mine_repo(repo, tmp_path / "o2", cfg(tag, weight=0), tmp_path / "cache", ollama_host=od.url)
    assert od.requests == [] and rep.teacher == {"status": "off"}
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["teacher"] == {"status": "off"}


def test_examples_written_split_correct_and_cached(od: OllamaDouble, tag: str, repo: Path,
                                                  tmp_path: Path) -> None:
    od.chat_reply = grounded
    c, cache = cfg(tag), tmp_path / "cache"
    rep = mine_repo(repo, tmp_path / "o1", c, cache, ollama_host=od.url)
    t = rep.teacher
    assert t["status"] == "ok" and t["reason"] == "" and t["errors"] == 0 and t["pending"] == 0
    assert t["asked"] == len(od.chats) == t["selected"] == t["accepted"] >= 10
    # Every call: Ollama's chat API, the named model, a JSON schema as `format`, greedy.
    for req in od.chats:
        assert req["model"] == tag and req["format"] == teacher.SCHEMA and req["stream"] is False
        assert req["options"]["temperature"] == 0 and req["messages"][0]["role"] == "system"
    assert {p for _, p in od.requests} <= {"/api/ps", "/api/show", "/api/chat", "/api/generate"}
    # Selection: code chunks only (never the README), each asked about once.
    assert "README.md" not in {path_of(r) for r in od.chats}
    assert len({user_of(r) for r in od.chats}) == len(od.chats)
    # The teacher was not loaded before the mine: it is unloaded after it (training is next).
    assert od.ps()["models"] == []

    out = tmp_path / "o1"
    train, valid = teacher_recs(out, "train.jsonl"), teacher_recs(out, "valid.jsonl")
    assert train and valid
    assert rep.by_kind["train"]["teacher"] == len(train) and rep.by_kind["valid"]["teacher"] == len(valid)
    # The file's split: held-out files' teacher examples are held out, and no training
    # example mentions a held-out path.
    split_of = {r["meta"]["path"]: s for s in ("train", "valid")
                for r in read(out, f"{s}.jsonl") if r["meta"]["kind"] == "continuation"}
    assert all(split_of[r["meta"]["path"]] == "train" for r in train)
    assert all(split_of[r["meta"]["path"]] == "valid" for r in valid)
    train_text = body(out, "train.jsonl").decode()
    for p in {r["meta"]["path"] for r in valid}:
        assert f"`{p}`" not in train_text
    for r in train + valid:
        assert set(r) == {"messages", "meta"} and "answer" not in r["meta"]  # not RAFT for the judge
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].startswith(f"In `{r['meta']['path']}`: What does `")
        assert r["meta"]["teacher"] == tag and r["meta"]["changed"] is True
    for name in ("train.jsonl", "valid.jsonl"):  # the mlx-lm copy holds them too
        assert len(read(out / "mlx", name)) == len(read(out, name))
    assert any(r["text"].startswith("<|im_start|>user\nIn `") for r in read(out / "mlx", "train.jsonl"))

    # Re-mine, nothing changed: not one call, the same bytes.
    od.requests.clear()
    again = mine_repo(repo, tmp_path / "o2", c, cache, ollama_host=od.url)
    assert od.requests == [] and again.teacher["asked"] == again.teacher["files_revisited"] == 0
    for name in ("train.jsonl", "valid.jsonl", "mlx/train.jsonl"):
        assert body(tmp_path / "o2", name) == body(out, name)

    # One function changes: only its chunk is asked about; the file's other chunk is cached.
    base = git(repo, "rev-parse", "HEAD")
    commit(repo, {"pkg/mod1.py": module(1).replace("total * 2", "total * 7")}, "Seven")
    n = len(od.chats)
    warm = mine_repo(repo, tmp_path / "o3", c, cache, changed_since=base, ollama_host=od.url)
    fresh = od.chats[n:]
    assert len(fresh) == 1 and path_of(fresh[0]) == "pkg/mod1.py" and "total * 7" in user_of(fresh[0])
    assert warm.teacher["files_revisited"] == 1 and warm.teacher["cached"] == 1
    recs = read(tmp_path / "o3", "train.jsonl") + read(tmp_path / "o3", "valid.jsonl")
    assert {r["meta"]["path"] for r in recs if r["meta"]["kind"] == "teacher" and r["meta"]["changed"]} \
        == {"pkg/mod1.py"}
    # A cold line store with the same answers gives the same dataset, without a call.
    cold_cache = tmp_path / "cold"
    cold_cache.mkdir()
    shutil.copy(cache / "mine.sqlite", cold_cache / "mine.sqlite")
    n = len(od.chats)
    mine_repo(repo, tmp_path / "o4", c, cold_cache, changed_since=base, ollama_host=od.url)
    assert len(od.chats) == n
    for name in ("train.jsonl", "valid.jsonl", "mlx/train.jsonl", "mlx/valid.jsonl"):
        assert body(tmp_path / "o4", name) == body(tmp_path / "o3", name), name


def test_no_planted_secret_reaches_teacher_examples(od: OllamaDouble, tag: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    leaky_dir: Path = request.getfixturevalue("leaky_repo")  # test_mine_secrets' planted repo
    # The teacher itself "leaks" a credential-shaped string: its output is scanned too.
    invented = "ghp_" + "Zq8vX2mP0rT6wY1u" * 2 + "Ab9c"

    def leaky(req: dict[str, Any]) -> str:
        q = json.loads(grounded(req))
        return json.dumps({"question": q["question"],
                           "answer": q["answer"] + f" Use the token {invented} to call it."})

    od.chat_reply = leaky
    cache = tmp_path / "cache"
    rep = mine_repo(leaky_dir, tmp_path / "out", cfg(tag, heldout_fraction=0.0), cache,
                    ollama_host=od.url)
    assert rep.teacher["accepted"] >= 3 and rep.teacher["redactions"].get("github_token", 0) >= 3
    # The prompts carry redacted code only: no planted secret went to Ollama either.
    sent = json.dumps(od.chats)
    assert "<SECRET>" in sent and "settings.py" in sent
    for kind, value in SECRETS.items():
        assert value not in sent, f"{kind} was sent to the teacher"
    recs = teacher_recs(tmp_path / "out", "train.jsonl")
    assert recs and any("<SECRET>" in r["messages"][1]["content"] for r in recs)
    dumped = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    db = sqlite3.connect(cache / "mine.sqlite")
    answers = [zlib.decompress(v).decode() for (v,) in db.execute("SELECT data FROM teacher")]
    db.close()
    stored = [p.read_bytes().decode("utf-8", "replace") for p in (cache / "lines").rglob("*")
              if p.is_file()]
    assert answers and any("<SECRET>" in a for a in answers)
    for where, text in (("dataset", dumped), ("answer cache", "".join(answers)),
                        ("line store", "".join(stored))):
        assert invented not in text, f"the teacher's token reached the {where}"
        for kind, value in SECRETS.items():
            assert value not in text, f"{kind} leaked into the {where}"


def test_worker_mine_stage_asks_at_the_publish_host(od: OllamaDouble, tag: str, repo: Path,
                                                    tmp_path: Path) -> None:
    """The daemon's worker passes ``[publish] ollama_host`` to the miner; the teacher's
    report travels in the stage result (the cycle report) and the manifest."""
    import threading

    from forged.common import config
    from forged.worker.main import run_stage

    od.chat_reply = grounded
    cfg_ = config.Config()
    cfg_.mine = cfg(tag, teacher_max_calls=2)
    cfg_.publish.ollama_host = od.url
    job = {"config": config.to_dict(cfg_), "repo_path": str(repo), "cache_dir": str(tmp_path / "cache"),
           "head_commit": git(repo, "rev-parse", "HEAD"), "base_commit": None}
    result = run_stage("mine", tmp_path / "cycle", job, threading.Event())
    t = result["manifest"]["teacher"]
    assert t["model"] == tag and t["asked"] == 2 == len(od.chats) and t["status"] == "partial"
    assert json.loads((tmp_path / "cycle" / "dataset" / "manifest.json").read_text())["teacher"] == t


# ------------------------------------------------------------------ failing


def test_ollama_down_or_model_missing_mine_completes(od: OllamaDouble, tag: str, repo: Path,
                                                     tmp_path: Path) -> None:
    od.chat_reply = grounded
    cache = tmp_path / "cache"
    od.down = True
    rep = mine_repo(repo, tmp_path / "o1", cfg(tag), cache, ollama_host=od.url)
    t = rep.teacher
    assert t["status"] == "unavailable" and "unreachable" in t["reason"] and od.url in t["reason"]
    assert t["asked"] == 0 and t["accepted"] == 0 and t["pending"] == t["selected"] > 0
    assert "teacher" not in rep.by_kind["train"] and rep.by_kind["train"]["raft"] > 0
    man = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert man["teacher"]["reason"] == t["reason"]
    od.down = False

    # A model Ollama does not have: asked about once (`show`), never pulled.
    rep = mine_repo(repo, tmp_path / "o2", cfg("no-such-model"), cache, ollama_host=od.url)
    t = rep.teacher
    assert t["status"] == "unavailable" and "'no-such-model' is not in Ollama" in t["reason"]
    assert "ollama pull no-such-model" in t["reason"]
    assert [p for _, p in od.requests] == ["/api/ps", "/api/show"] and not od.chats

    # Ollama back: the files left pending are asked about now.
    rep = mine_repo(repo, tmp_path / "o3", cfg(tag), cache, ollama_host=od.url)
    assert rep.teacher["status"] == "ok" and rep.teacher["accepted"] == rep.teacher["selected"] > 0
    assert rep.by_kind["train"]["teacher"] > 0


def test_bad_output_rejected_and_counted(od: OllamaDouble, tag: str, repo: Path, tmp_path: Path) -> None:
    replies = {
        "pkg/mod0.py": "Sure! Here is a question: what does it do?",
        "pkg/mod1.py": json.dumps({"question": "  ", "answer": "It doubles n."}),
        "pkg/mod2.py": json.dumps({"question": "What does `helper_2` do?", "answer": "x" * 2000}),
        "pkg/mod3.py": json.dumps({"question": "What is the weather like?", "answer": "Sunny."}),
        "pkg/mod4.py": json.dumps({"answer": 3}),
        # Fenced and chatty, but parseable; both chunks of mod5 name helper_5 (the class
        # calls it), so the second is a duplicate question.
        "pkg/mod5.py": "Here you go:\n```json\n" + json.dumps(
            {"Question": "What does `helper_5` return?", "Answer": "`helper_5(n)` returns twice "
             "the sum of k * 5 for k below n."}) + "\n```",
        "web/app.js": json.dumps([{"question": "What port does `bootServer` start on?",
                                   "answer": "`cfg.port + 1`, via `startOn`."}]),
    }
    why = {"pkg/mod0.py": "unparseable", "pkg/mod1.py": "empty", "pkg/mod2.py": "too_long",
           "pkg/mod3.py": "ungrounded", "pkg/mod4.py": "bad_fields"}
    od.chat_reply = lambda req: replies[path_of(req)]
    rep = mine_repo(repo, tmp_path / "o", cfg(tag), tmp_path / "cache", ollama_host=od.url)
    t = rep.teacher
    per_path = Counter(path_of(r) for r in od.chats)
    assert per_path["pkg/mod5.py"] == 2 and t["asked"] == len(od.chats) == sum(per_path.values())
    expected = Counter()
    for p, n in per_path.items():
        if p in why:
            expected[why[p]] += n
    expected["duplicate"] = 1
    assert t["rejected"] == dict(sorted(expected.items()))
    assert t["accepted"] == 2 and t["accepted"] + sum(t["rejected"].values()) == t["asked"]
    recs = teacher_recs(tmp_path / "o", "train.jsonl") + teacher_recs(tmp_path / "o", "valid.jsonl")
    assert sorted(r["meta"]["path"] for r in recs) == ["pkg/mod5.py", "web/app.js"]
    # Rejections are cached too (a re-mine does not ask again for the same garbage).
    od.chats.clear()
    again = mine_repo(repo, tmp_path / "o2", cfg(tag), tmp_path / "cache", ollama_host=od.url)
    assert not od.chats and again.teacher["asked"] == 0


def test_call_cap_spreads_asking_over_mines(od: OllamaDouble, tag: str, repo: Path, tmp_path: Path) -> None:
    od.chat_reply = grounded
    c, cache = cfg(tag, teacher_max_calls=3), tmp_path / "cache"
    first = mine_repo(repo, tmp_path / "o1", c, cache, ollama_host=od.url)
    t = first.teacher
    assert t["asked"] == 3 == t["accepted"] and t["status"] == "partial"
    assert "teacher_max_calls = 3" in t["reason"] and t["pending"] == t["selected"] - 3
    # Answers so far are already examples (lines written from memory until a file is done).
    got = teacher_recs(tmp_path / "o1", "train.jsonl") + teacher_recs(tmp_path / "o1", "valid.jsonl")
    assert len(got) == 3
    asked1 = {user_of(r) for r in od.chats}
    od.chats.clear()
    second = mine_repo(repo, tmp_path / "o2", c, cache, ollama_host=od.url)
    t = second.teacher
    assert t["asked"] == 3 and t["selected"] == t["cached"] + t["asked"] + t["pending"]
    assert t["pending"] == first.teacher["pending"] - 3
    assert not asked1 & {user_of(r) for r in od.chats}  # never the same chunk twice
    # 0 calls: only what is cached.
    od.chats.clear()
    only = mine_repo(repo, tmp_path / "o3", cfg(tag, teacher_max_calls=0), cache, ollama_host=od.url)
    assert not od.chats and only.teacher["status"] == "partial"
    assert only.by_kind["train"].get("teacher", 0) + only.by_kind["valid"].get("teacher", 0) == 6


def test_timeouts_stop_asking_and_the_mine_completes(od: OllamaDouble, tag: str, repo: Path,
                                                     tmp_path: Path) -> None:
    def slow(req: dict[str, Any]) -> str:
        time.sleep(1.5)
        return grounded(req)

    od.chat_reply = slow
    t0 = time.monotonic()
    rep = mine_repo(repo, tmp_path / "o", cfg(tag, teacher_timeout_seconds=0.4), tmp_path / "cache",
                    ollama_host=od.url)
    assert time.monotonic() - t0 < 30
    t = rep.teacher
    assert t["errors"] == t["asked"] == teacher.MAX_ERRORS_IN_A_ROW and t["error_kinds"] == {"timeout": 3}
    assert t["status"] == "partial" and "in a row failed" in t["reason"] and "teacher_timeout_seconds" in t["reason"]
    assert t["pending"] == t["selected"] and "teacher" not in rep.by_kind["train"]
    assert rep.examples["train"] > 0


# ------------------------------------------------------- the model itself


@needs_llama
def test_random_model_under_the_schema_grammar(od: OllamaDouble, tag: str, repo: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A bounded schema makes the random model close its strings: valid JSON, nonsense text.
    client = ollama.Client(od.url)
    small = {"type": "object", "properties": {"question": {"type": "string", "maxLength": 40},
                                              "answer": {"type": "string", "maxLength": 60}},
             "required": ["question", "answer"]}
    msgs = [{"role": "user", "content": "Ask about `helper_1`."}]
    r = client.chat(model=tag, messages=msgs, format=small, options={"temperature": 0, "num_predict": 200})
    obj = json.loads(r.message.content)
    assert set(obj) == {"question", "answer"} and len(obj["question"]) <= 40 and len(obj["answer"]) <= 60
    r = client.chat(model=tag, messages=msgs, format="json", options={"temperature": 0, "num_predict": 8})
    assert r.message.content.lstrip().startswith("{")
    # (the client refuses other strings itself; Ollama answers 400 to them)
    bad = httpx.post(f"{od.url}/api/chat", json={"model": tag, "messages": msgs, "format": "yaml",
                                                 "stream": False})
    assert bad.status_code == 400 and "invalid format" in bad.json()["error"]
    parsed, _ = teacher.parse_reply(json.dumps(obj))
    assert teacher.check(parsed, frozenset({"helper_1"})) is not None  # nonsense is rejected

    # The miner's own schema (no length bounds): the random model rambles until num_predict
    # (kept small here: each token costs a grammar check over the whole vocabulary).
    monkeypatch.setattr(teacher, "NUM_PREDICT", 24)
    od.chats.clear()
    rep = mine_repo(repo, tmp_path / "o", cfg(tag, teacher_max_calls=2), tmp_path / "cache",
                    ollama_host=od.url)
    t = rep.teacher
    assert t["asked"] == 2 and t["errors"] == 0 and t["accepted"] == 0
    assert t["rejected"] == {"truncated": 2}
    assert all(r["format"] == teacher.SCHEMA and r["options"]["num_predict"] == 24 for r in od.chats)


# -------------------------------------------------------------- pure rules


def _chunk(text: str) -> Chunk:
    return Chunk("a.py", "python", "", 1, text.count("\n") + 1, text)


def test_parse_reply_is_defensive() -> None:
    ok = {"q": "What does `f_x` do?", "a": "Adds."}
    for text in ('{"question": "What does `f_x` do?", "answer": "Adds."}',
                 '```json\n{"question": "What does `f_x` do?", "answer": "Adds."}\n```',
                 'Sure:\n{"QUESTION": "What does `f_x` do?", "Answer": "Adds."}\nThanks',
                 '[{"question": "What does `f_x` do?", "answer": "Adds."}]'):
        assert teacher.parse_reply(text)[0] == ok, text
    assert teacher.parse_reply('{"question": "q", "answer": "a')[0] == {"bad": "unparseable"}
    assert teacher.parse_reply('{"question": "q", "answer": "a', "length")[0] == {"bad": "truncated"}
    assert teacher.parse_reply('{"question": "q", "answer": ["a"]}')[0] == {"bad": "bad_fields"}
    assert teacher.parse_reply("")[0] == {"bad": "unparseable"}


def test_grounding_rule_and_anchors() -> None:
    c = _chunk("def load_config(path):\n    data = read(path)\n    return parseArgs(data, v2)\n")
    anc = teacher.anchors(c, ["load_config"])
    assert anc == {"load_config", "parseArgs"}  # `data`, `read`, `path`, `v2` are too plain/short
    assert teacher.check({"q": "What does load_config return?", "a": "A dict."}, anc) is None
    assert teacher.check({"q": "What does it return?", "a": "It calls `parseArgs`."}, anc) is None
    assert teacher.check({"q": "What does it return?", "a": "A dict of data."}, anc) == "ungrounded"
    assert teacher.check({"q": "load_configs?", "a": "No."}, anc) == "ungrounded"  # whole names only
    assert teacher.check({"q": "?", "a": "load_config"}, anc) == "empty"
    assert teacher.check({"q": "load_config?", "a": "y" * 1501}, anc) == "too_long"


def test_selection_is_deterministic_and_seeded() -> None:
    from forged.worker.mine.chunker import analyze, budget_bytes
    from forged.worker.mine.examples import MinedFile

    text = "".join(module(i) for i in range(12))
    fa = analyze("pkg/all.py", "python", text.encode(), budget_bytes(64))
    mf = MinedFile("pkg/all.py", "python", "blob", fa, False, "train")
    a = [it.index for it in teacher.select(mf, 0.5, 0, "m")]
    assert a == [it.index for it in teacher.select(mf, 0.5, 0, "m")]
    assert 0 < len(a) < len(teacher.select(mf, 1.0, 0, "m"))
    assert a != [it.index for it in teacher.select(mf, 0.5, 1, "m")]
    keys = {it.key for it in teacher.select(mf, 1.0, 0, "m")}
    assert not keys & {it.key for it in teacher.select(mf, 1.0, 0, "other-model")}
    md = MinedFile("README.md", "markdown", "blob", fa, False, "train")
    assert teacher.select(md, 1.0, 0, "m") == []  # code chunks only
    # The cache key follows the chunk, not where it sits: lines added above it keep it.
    c = fa.chunks[3]
    moved = Chunk(c.path, c.lang, c.symbol, c.start_line + 40, c.end_line + 40, c.text, c.context)
    assert teacher.cache_key("m", teacher.prompt(c, "python")) == \
        teacher.cache_key("m", teacher.prompt(moved, "python"))
    assert teacher.cache_key("m", teacher.prompt(c, "python")) != \
        teacher.cache_key("m", teacher.prompt(moved, "rust"))
