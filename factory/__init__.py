"""SLM Factory: agent logs in, specialist small language models out.

A newcomer's map of the stages, the modules and where a new log format, task kind, recipe
or export goes: docs/architecture.md.
"""

__version__ = "0.1.0"
