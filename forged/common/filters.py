"""Which files the miner reads — shared by change accounting (daemon) and the miner.

Kept free of heavy imports: the daemon uses it to count only changes that matter.
Git-ignored files are not decided here: both callers ask git itself
(``git ls-files`` lists only tracked files; the watcher asks ``git check-ignore``).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import PurePosixPath

# Extension → language. Docs are split by headings rather than parsed as code.
LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".tsx": "tsx",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".md": "markdown", ".markdown": "markdown",
    ".rst": "rst",
}

# Never read, whatever their extension: credential stores and keys.
SECRET_FILE_GLOBS = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
    "*.keystore", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", "_netrc",
    ".pgpass", ".npmrc", ".pypirc", "credentials", "credentials.*", ".git-credentials",
    "*.kdbx", "secrets.*", "*.secret", "*.secrets", "htpasswd", ".htpasswd",
)

VENDORED_DIRS = frozenset({
    "vendor", "vendors", "node_modules", "third_party", "third-party", "bower_components",
    ".venv", "venv", "site-packages", "dist", "build", "target", "__pycache__", ".tox",
    ".mypy_cache", ".next", ".nuxt", "Pods", "Carthage",
})

LOCK_FILES = frozenset({
    "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Pipfile.lock",
    "Cargo.lock", "go.sum", "composer.lock", "Gemfile.lock", "uv.lock", "bun.lockb",
})

GENERATED_NAME = re.compile(
    r"(\.min\.(js|css|mjs)$)|(\.bundle\.js$)|(_pb2(_grpc)?\.pyi?$)|(\.pb\.go$)|(\.generated\.\w+$)|(\.d\.ts$)"
)


def language_of(path: str) -> str | None:
    return LANGUAGES.get(PurePosixPath(path).suffix.lower())


def is_secret_file(path: str) -> bool:
    name = PurePosixPath(path).name
    return any(fnmatch.fnmatchcase(name, g) for g in SECRET_FILE_GLOBS)


def skip_reason(path: str) -> str | None:
    """Why the miner would not read this repo-relative path by name alone, or None.

    Content checks (binary, size, UTF-8, generated markers) happen in the miner.
    """
    p = PurePosixPath(path)
    if is_secret_file(path):
        return "secret_file"
    if any(part in VENDORED_DIRS for part in p.parts[:-1]):
        return "vendored"
    if p.name in LOCK_FILES:
        return "lock_file"
    if GENERATED_NAME.search(p.name):
        return "generated"
    if language_of(path) is None:
        return "unsupported_language"
    return None


def miner_reads(path: str) -> bool:
    return skip_reason(path) is None
