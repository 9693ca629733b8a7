"""Audit a dataset with a trained run: rank the misaligned pairs, say which pair is broken, show them in a page
(docs/AUDIT.md). ``python -m harmony.audit --run RUN_DIR --out OUT_DIR``."""
