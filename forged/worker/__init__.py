"""The worker process: one heavy stage (mine, train, judge) per subprocess, progress as JSON lines on stdout."""
