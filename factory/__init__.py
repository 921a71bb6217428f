"""SLM Factory: agent logs in, specialist small language models out.

A newcomer's map of the stages, the modules and where a new log format, task kind, recipe
or export goes: docs/architecture.md.
"""

__version__ = "0.1.0"

import logging

# bitsandbytes (the dev and gpu extras) warns when imported, on CPUs with AVX512-BF16, that it
# cannot fetch a faster 4-bit CPU kernel from the Hugging Face Hub; it falls back to its own, and
# nothing here downloads at run time, so every command would print it for nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
