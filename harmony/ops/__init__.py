"""Kernel ops of harmony (SPEC §6): each has a pure-PyTorch ``*_ref`` and a dispatching public function."""
from harmony.ops.combine import combine_ref
from harmony.ops.ghost_dots import ghost_dots_ref, use_gram_form
from harmony.ops.gram import gram_ref

__all__ = ["gram_ref", "combine_ref", "ghost_dots_ref", "use_gram_form"]
