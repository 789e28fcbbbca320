"""The evaluation side: leakage attacks and their measures, ``splitunet leakage``, ``splitunet sweep`` with its
defense table, and ``splitunet bench``. Never imported by the training path (docs/design.md, "Boundaries"): the
only bridge is the server's opt-in ``CaptureFeatures`` filter, whose files these modules read.
"""
