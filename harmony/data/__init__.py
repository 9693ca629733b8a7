"""Data for harmony (docs/DATA.md): synthetic misalignment benchmark, real clips from a JSONL manifest,
WebDataset shards; one batch contract (see ``harmony.data.batch``) and one loader API."""
from harmony.data.batch import BAD_KINDS, collate
from harmony.data.loader import Loader, build_dataset, build_loader
from harmony.data.text import tokenize

__all__ = ["BAD_KINDS", "Loader", "build_dataset", "build_loader", "collate", "tokenize"]
