"""Run-time side: the reference executor (and later the artifact runtime)."""
