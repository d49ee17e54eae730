"""Training of LLaVA-1.5: arguments, data pipeline, trainer and entry points."""
