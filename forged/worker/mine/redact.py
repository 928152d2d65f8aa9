"""Secret redaction: every text that enters a dataset passes through :func:`redact`.

Two layers. Strong regexes for credentials with a recognisable shape (cloud keys, VCS and
chat tokens, private key blocks, passwords in URLs, keyword assignments, high-entropy
string literals) replace the secret with ``<SECRET>``. Then lines that a cheap prefilter
marks as suspicious (a secret-ish keyword assigned a literal, or a long quoted token) go
through detect-secrets' plugins, and every value they report is replaced too. Running
detect-secrets only on those lines keeps its findings while costing a fraction of a scan
of every line (its line-at-a-time eager mode floods with false positives; the prefilter
keeps it in the same candidates file mode would consider).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable

SECRET = "<SECRET>"
REDACT_VERSION = "2"

# (kind, pattern, group holding the secret (0 = all), gate: the pattern runs only when one
# of these literal needles occurs, or the gate pattern matches. A gate is a necessary
# condition that scans fast: a substring test, or a regex that starts with a literal (re
# then skips to that literal; a pattern that starts with \b or a class tries every position,
# which made url_password alone 37% of redaction on Java sources).)
_Sub = tuple[str, re.Pattern[str], int, tuple[str, ...] | re.Pattern[str]]

_STRONG: list[_Sub] = [
    ("private_key", re.compile(
        r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
        re.S), 0, ("PRIVATE KEY",)),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"), 0,
     re.compile(r"A(?:KIA|SIA|GPA|IDA|ROA|NPA|NVA|IPA)[A-Z0-9]{16}")),
    ("aws_secret_key", re.compile(
        r"(?i)aws.{0,24}?(?:secret|key).{0,24}?[\"'=:\s]([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"), 1,
     ("aws", "AWS", "Aws")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})\b"), 0,
     re.compile(r"g(?:h[pousr]|ithub_pat)_")),
    ("gitlab_token", re.compile(r"\bgl(?:pat|dt|rt|ptt|cbt|imt|soat|ft)-[A-Za-z0-9_\-]{20,}"), 0,
     re.compile(r"gl(?:pat|dt|rt|ptt|cbt|imt|soat|ft)-")),
    ("slack_token", re.compile(r"\bxox[abposre]-[A-Za-z0-9\-]{10,}"), 0, ("xox",)),
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_\-]+"), 0,
     ("hooks.slack.com",)),
    ("stripe_key", re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"), 0, ("_live_", "_test_")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), 0, ("AIza",)),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), 0, ("eyJ",)),
    ("npm_token", re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"), 0, ("npm_",)),
    ("openai_key", re.compile(r"\bsk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{20,}"), 0, ("sk-",)),
    ("sendgrid_key", re.compile(r"\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"), 0, ("SG.",)),
    ("twilio_key", re.compile(r"\bSK[0-9a-fA-F]{32}\b"), 0, re.compile(r"SK[0-9a-fA-F]{32}")),
    ("url_password", re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@'\"<>]+:([^/\s@'\"<>]{3,})@"), 1,
     re.compile(r"://[^/\s:@'\"<>]+:[^/\s@'\"<>]{3,}@")),
    # Last: run per keyword line only (see redact()).
    ("keyword_assignment", re.compile(
        r"(?i)(?:passw(?:or)?d|passwd|pwd|secret|token|api_?key|apikey|access_?key|"
        r"private_?key|client_?secret|auth_?key|credentials?)[\w.\-]*[\"']?\s*(?::=|=>|[:=])\s*"
        r"[bfru]?([\"'])([^\"'\s]{6,})\1"), 2, ()),
]
# Unquoted values after a keyword (docs, env-style lines): only when they look like keys.
_KEYWORD_BARE = re.compile(
    r"(?i)(?:passw(?:or)?d|passwd|pwd|secret|token|api_?key|apikey|access_?key|private_?key|"
    r"client_?secret|auth_?key|credentials?)[\w.\-]*[\"']?\s*(?::=|=>|[:=])\s*`?"
    r"([^\s\"'`,;()\[\]{}<>]{12,})")
_KEYWORDS = ("passw", "pwd", "secret", "token", "apikey", "api_key", "access_key", "accesskey",
             "private", "credential", "auth")

# A quoted run of token characters long enough to be a key.
_LONG_LITERAL = re.compile(r"([\"'`])([A-Za-z0-9+/=_\-]{20,}|[0-9a-fA-F]{32,})\1")
# A keyword line worth detect-secrets' time: the keyword is assigned a literal.
_PREFILTER = re.compile(
    r"(?i)(?:passw|pwd|secret|token|api_?key|apikey|access_?key|private|credential|auth)"
    r"[\w.\-]*[\"']?\s*(?::=|=>|[:=])\s*[bfru]?[\"'`]"
)
_DOC_PREFILTER = re.compile(
    r"(?i)(?:passw|pwd|secret|token|api_?key|apikey|access_?key|private|credential|auth)"
    r"[\w.\-]*[\"']?\s*(?::=|=>|[:=])\s*\S"
)
_PLACEHOLDER = re.compile(r"^(?:[a-z_]+|[A-Z_]+|[a-z][a-zA-Z]*|<.*>|\$.*|\{.*\}|%.*|\*+|x+|\.+)$")


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _looks_random(s: str) -> bool:
    """detect-secrets' high-entropy thresholds: base64 ≥ 4.5 bits, hex ≥ 3.0 bits."""
    if re.fullmatch(r"[0-9a-fA-F]+", s):
        return len(s) >= 32 and _entropy(s) >= 3.0 and not s.isdigit()
    # Identifiers (snake/camel words) are not keys even when long.
    if re.fullmatch(r"[A-Za-z]+(?:[_\-][A-Za-z]+)*", s):
        return False
    return _entropy(s) >= 4.5 or (len(s) >= 32 and _entropy(s) >= 4.2)


def _not_keylike(v: str) -> bool:
    """Bare words after `token:` are usually code (`token: Token`), keys mix digits in."""
    return not (re.search(r"\d", v) and re.search(r"[A-Za-z]", v) and _entropy(v) >= 3.5)


_detect_ready = False


def _detect_secrets_values(lines: list[str], path: str) -> list[tuple[str, str]]:
    """(kind, value) that detect-secrets' plugins report on these lines."""
    global _detect_ready
    from detect_secrets.core import scan

    if not _detect_ready:
        # Enable every plugin and the default filters once for this process.
        from detect_secrets.settings import default_settings

        default_settings().__enter__()
        _detect_ready = True
    out = []
    for s in scan._process_line_based_plugins(list(enumerate(lines, 1)), path or "file"):
        v = s.secret_value or ""
        if len(v) >= 6 and SECRET not in v:
            out.append((s.type.lower().replace(" ", "_"), v))
    return out


# What follows a keyword in every assignment the keyword regexes look for: a line without
# it cannot match them, and skipping it keeps code full of `private`/`token` cheap.
_ASSIGN_TAIL = re.compile(r"[\w.\-]*[\"']?\s*(?::=|=>|[:=])")
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _keyword_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line where a secret-ish keyword is assigned something, found by
    substring search (far cheaper than a case-insensitive regex scan of the whole text)."""
    low = text.lower()
    if len(low) != len(text):  # a few non-ASCII letters lower to two characters
        low = text.translate(_ASCII_LOWER)
    spans: set[tuple[int, int]] = set()
    for kw in _KEYWORDS:
        i = low.find(kw)
        while i >= 0:
            if _ASSIGN_TAIL.match(low, i + len(kw)):
                s = low.rfind("\n", 0, i) + 1
                e = low.find("\n", i)
                e = len(low) if e < 0 else e
                spans.add((s, e))
                i = low.find(kw, e)
            else:
                i = low.find(kw, i + 1)
    return sorted(spans)


def redact(text: str, path: str = "", *, deep: bool = True) -> tuple[str, Counter[str]]:
    """``text`` with every secret found replaced by ``<SECRET>``, and counts by kind.

    ``deep=False`` skips detect-secrets (the regex layer only): used as the last pass over
    finished examples, whose sources were already scanned deeply.
    """
    counts: Counter[str] = Counter()
    for kind, pat, group, gate in _STRONG[:-1]:
        if gate.search(text) if isinstance(gate, re.Pattern) else any(n in text for n in gate):
            text = _sub(text, pat, group, kind, counts)
    text = _sub(text, _LONG_LITERAL, 2, "high_entropy_string", counts,
                keep=lambda v: not _looks_random(v))
    lines = _keyword_lines(text)
    if not lines:
        return text, counts
    # Keyword lines only: the assignment regex, then detect-secrets on the suspicious ones.
    kw_pat = _STRONG[-1][1]
    is_doc = path.lower().endswith((".md", ".markdown", ".rst", ".txt"))
    pre = _DOC_PREFILTER if is_doc else _PREFILTER
    parts: list[str] = []
    cand: list[str] = []
    last = 0
    for s, e in lines:
        line = _sub(text[s:e], kw_pat, 2, "keyword_assignment", counts,
                    keep=lambda v: bool(_PLACEHOLDER.match(v)) or "(" in v)
        line = _sub(line, _KEYWORD_BARE, 1, "keyword_assignment", counts, keep=_not_keylike)
        parts += [text[last:s], line]
        last = e
        if deep and pre.search(line):
            cand.append(line)
    parts.append(text[last:])
    text = "".join(parts)
    if cand:
        for kind, value in _detect_secrets_values(cand, path):
            if value in text and not _PLACEHOLDER.match(value):
                counts[kind] += text.count(value)
                text = text.replace(value, SECRET)
    return text, counts


def _sub(text: str, pat: re.Pattern[str], group: int, kind: str, counts: Counter[str],
         keep: Callable[[str], bool] | None = None) -> str:
    def repl(m: re.Match[str]) -> str:
        value = m.group(group)
        if SECRET in value or (keep is not None and keep(value)):
            return m.group(0)
        counts[kind] += 1
        if group == 0:
            return SECRET
        a, b = m.start(group) - m.start(0), m.end(group) - m.start(0)
        whole = m.group(0)
        return whole[:a] + SECRET + whole[b:]

    return pat.sub(repl, text)
