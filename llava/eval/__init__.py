"""Evaluation: the shared generation loop, per-benchmark question/answer files, and the scorers.

Scorers and converters read and write the benchmarks' official formats (README: Evaluation data); every answer is
normalised by ``llava.eval.answer_processor`` (the official VQA processor).
"""
