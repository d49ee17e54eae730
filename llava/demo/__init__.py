"""The embedded default: a tiny, fully local version of the pipeline (data generated here, not downloaded).

`llava.demo.synthetic` writes a synthetic visual-instruction task (training mix, projector-pretraining
pairs, a text corpus for the tiny tokenizer and the seven benchmarks) in the real file formats, so the
demo runs the same training and evaluation entry points as the real LLaVA-1.5 data.
"""
