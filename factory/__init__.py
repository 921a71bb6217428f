"""SLM Factory: agent logs in, specialist small language models out."""

__version__ = "0.1.0"
