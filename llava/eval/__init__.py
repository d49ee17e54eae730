"""Evaluation: the shared generation loop, per-benchmark question/answer files, and the scorers.

Scorers and converters read and write the official formats described in FORMATS.md; every answer is
normalised by ``llava.eval.answer_processor`` (the official VQA processor).
"""
