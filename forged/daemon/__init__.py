"""The daemon process: watchers, change accounting, gates, the cycle engine, the control socket, publishing. Imports no ML library and nothing from forged.worker."""
