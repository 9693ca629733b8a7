"""The method: per-sample cross-modal gradient measurement, realignment and curriculum.

``harmonizer`` (``GradientHarmonizer``: measure, realign, weight, update) coordinates ``recorder`` (forward hooks
and kept activations), ``strategies`` (one per measurement tier) and the tiers themselves (``ghost``,
``materialize``, ``sketch``, ``feature``; per-layer samplers in ``grad_sample``); ``realign`` (the rules as
per-sample coefficients), ``curriculum`` (schedule, score sources, mixture, memory, rules, target), ``agreement``
(the cross-modal neighbourhood agreement) and ``detectors`` (every detector side by side); ``stats``
(``HarmonyStats``, what a step measured and decided). It uses the ops (harmony.ops) and the model's losses, never
the trainer.
"""
