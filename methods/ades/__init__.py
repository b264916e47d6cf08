"""ADES, its readings and Static-DES, with the cue/eps machinery only they use."""

from methods.ades import ades, ades_bilevel, static_des  # noqa: F401  (registers them)
