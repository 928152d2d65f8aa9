"""Shared by both processes: config, paths, logging, file filters, GGUF headers, base models, the worker protocol. Stdlib-light: no ML imports."""
