"""Personal GPTs: make a personal GPT from a template, chat with it, share it.

The package is the core: importable and testable without Streamlit. Only
``personal_gpt.web`` talks to Streamlit; heavy libraries (torch, transformers)
are imported inside the functions that need them.
"""

import os as _os

__version__ = "0.1.0"

# torch and llama.cpp run their CPU work in OpenMP teams of one runtime (libgomp) in this process. Once a
# second team exists (torch's, after the embedder or the torch path computed on another thread), libgomp
# counts more threads than cores and cuts the spin of every waiting thread to almost nothing. llama.cpp then
# sleeps and wakes at each of the hundreds of barriers of a decode step: chats on the bundled model ran ~40%
# slower (117 -> 73 tokens/s; bench/kernels.py --torch-threads 2). These keep libgomp's usual spin (300,000
# rounds, then sleep) in that case too. They must be set before libgomp loads, so here, before any torch or
# llama_cpp import; a value already in the environment wins, and PERSONAL_GPT_OMP_SPIN=0 leaves both unset.
if _os.environ.get("PERSONAL_GPT_OMP_SPIN", "1") != "0":
    _os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    _os.environ.setdefault("GOMP_SPINCOUNT", "300000")
