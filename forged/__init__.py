"""forged: keeps a small local code model fine-tuned on your git repos, served through Ollama."""

__version__ = "0.1.0"
