"""Planted fake credentials never reach the dataset (files, commit messages, diffs)."""

from __future__ import annotations

import random
import sqlite3
import string
import subprocess
import zlib
from pathlib import Path

import pytest

pytest.importorskip("tree_sitter")

from forged.common.config import MineConfig  # noqa: E402
from forged.worker.mine import mine_repo  # noqa: E402
from forged.worker.mine.redact import SECRET, redact  # noqa: E402

# Built at run time so no credential-shaped literal sits in this repo.
R = random.Random(1234)


def rnd(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


UP = string.ascii_uppercase + string.digits
SECRETS = {
    "aws_access_key": "AKIA" + rnd(16, UP),
    "aws_secret_key": rnd(40, string.ascii_letters + string.digits + "/+"),
    "github_token": "ghp_" + rnd(36),
    "github_pat": "github_pat_" + rnd(22) + "_" + rnd(59),
    "gitlab_token": "glpat-" + rnd(20),
    "slack_token": "xoxb-" + rnd(12, string.digits) + "-" + rnd(13, string.digits) + "-" + rnd(24),
    "slack_webhook": "https://hooks.slack.com/services/T" + rnd(8, UP) + "/B" + rnd(8, UP) + "/" + rnd(24),
    "stripe": "sk_" + "live_" + rnd(24),
    "google": "AIza" + rnd(35),
    "npm": "npm_" + rnd(36),
    "twilio": "SK" + rnd(32, "0123456789abcdef"),
    "url_password": "pw" + rnd(14),
    "keyword_password": "Pw!" + rnd(13),
    "high_entropy": rnd(44, string.ascii_letters + string.digits + "+/"),
    "hex_key": rnd(48, "0123456789abcdef"),
    "env_file": "envonly" + rnd(20),
    "pem_body": rnd(64, string.ascii_letters + string.digits + "+/"),
    "jwt": "eyJ" + rnd(20) + ".eyJ" + rnd(30) + "." + rnd(30),
    "md_token": rnd(32),
    "commit_msg": "ghp_" + rnd(36),
    "history_only": "AKIA" + rnd(16, UP),
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def commit(repo: Path, files: dict[str, str], msg: str) -> None:
    for rel, content in files.items():
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@e.st", "-c", "user.name=T", "commit", "-qm", msg)


@pytest.fixture()
def leaky_repo(tmp_path: Path) -> Path:
    s = SECRETS
    r = tmp_path / "leaky"
    r.mkdir()
    git(r, "init", "-q")
    settings = f'''"""Settings."""
AWS_ACCESS_KEY_ID = "{s["aws_access_key"]}"
AWS_SECRET_ACCESS_KEY = "{s["aws_secret_key"]}"
GITHUB = "{s["github_token"]}"
GH_FINE = "{s["github_pat"]}"
GITLAB = "{s["gitlab_token"]}"
SLACK = "{s["slack_token"]}"
HOOK = "{s["slack_webhook"]}"
STRIPE = "{s["stripe"]}"
MAPS = "{s["google"]}"
DATABASE_URL = "postgres://admin:{s["url_password"]}@db.internal:5432/app"
password = "{s["keyword_password"]}"
blob = "{s["high_entropy"]}"
signing = "{s["hex_key"]}"
SESSION = "{s["jwt"]}"
# twilio: {s["twilio"]} (unquoted: only its own pattern can find it)


def connect(url: str = DATABASE_URL) -> str:
    """Connect using the configured credentials."""
    return url + GITHUB
'''
    pem = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(
        s["pem_body"][i:i + 16] for i in range(0, 64, 16)) + "\n-----END RSA PRIVATE KEY-----\n")
    commit(r, {
        "app/settings.py": settings,
        "app/keys.py": f'KEY = """{pem}"""\n\n\ndef key() -> str:\n    return KEY\n',
        "web/client.js": f'const npmToken = "{s["npm"]}";\nexport function auth() {{\n  return npmToken;\n}}\n',
        "docs/setup.md": f"# Setup\n\nUse the token `{s['md_token']}` with `api_key: {s['md_token']}`.\n",
        ".env": f"SECRET_KEY={s['env_file']}\n",
        ".env.production": f"DB_PASS={s['env_file']}\n",
        "deploy/server.pem": pem,
        "id_rsa": pem,
    }, "Initial settings")
    commit(r, {"app/tmp.py": f'TOKEN_ID = "{s["history_only"]}"\n'}, "Add temp token")
    commit(r, {"app/tmp.py": "TOKEN_ID = None\n"}, f"Remove leaked token {s['commit_msg']}")
    return r


def test_no_planted_secret_reaches_the_dataset(leaky_repo: Path, tmp_path: Path) -> None:
    cfg = MineConfig(chunk_tokens=64, workers=1, heldout_fraction=0.0)
    cfg.kinds.commit_diff = 1.0
    out, cache = tmp_path / "out", tmp_path / "cache"
    rep = mine_repo(leaky_repo, out, cfg, cache)
    dumped = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert SECRET in dumped
    for kind, value in SECRETS.items():
        assert value not in dumped, f"{kind} leaked into the dataset"
    # Not in the cache either (it stores redacted analyses only).
    db = sqlite3.connect(cache / "mine.sqlite")
    blobs = [zlib.decompress(v).decode() for t in ("analysis", "commit_diff")
             for (v,) in db.execute(f"SELECT data FROM {t}")]
    # ... nor in the line store (finished lines, symbol table) kept for re-mines.
    blobs += [p.read_bytes().decode("utf-8", "replace") for p in (cache / "lines").rglob("*")
              if p.is_file()]
    assert any("<SECRET>" in b for b in blobs)
    for kind, value in SECRETS.items():
        assert not any(value in b for b in blobs), f"{kind} leaked into the cache"
    assert rep.skipped.get("secret_file", 0) == 4  # .env, .env.production, server.pem, id_rsa
    assert sum(rep.redactions.values()) >= 15
    assert rep.by_kind["train"].get("commit_diff", 0) >= 1  # history was mined, redacted


def test_redact_keeps_ordinary_code() -> None:
    code = ('def tokenize(text):\n    token_type = "access_token"\n    password = get_password()\n'
            '    return [t for t in text.split()]\n')
    assert redact(code)[0] == code


def test_redact_after_letters_that_lowercase_longer() -> None:
    # "İ".lower() is two characters: keyword lines found in the lowered text must still be
    # cut from the original at the right place (they were not, and the password leaked).
    text = 'name = "İİİİİİİİ"\ndb_password = "correct-h0rse-battery"\n'
    clean, counts = redact(text, "settings.py")
    assert "correct-h0rse-battery" not in clean
    assert clean.startswith('name = "İİİİİİİİ"\n') and counts["keyword_assignment"] == 1


def test_redact_skips_keywords_not_assigned_but_finds_later_ones() -> None:
    # `private` on a line is not a secret; a second keyword on the same line that is
    # assigned a literal still is.
    code = ('class A {\n    private final String name;\n'
            '    private String auth = "x"; private String authToken = "Zq8vX2mP0rT6wY1u";\n}\n')
    clean, _ = redact(code, "A.java")
    assert "Zq8vX2mP0rT6wY1u" not in clean
    assert "private final String name;" in clean
