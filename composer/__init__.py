"""composer: build new language models out of existing ones, with no training."""

__version__ = "0.1.0"
