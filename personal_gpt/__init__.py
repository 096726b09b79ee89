"""Personal GPTs: make a personal GPT from a template, chat with it, share it.

The package is the core: importable and testable without Streamlit. Only
``personal_gpt.web`` talks to Streamlit; heavy libraries (torch, transformers)
are imported inside the functions that need them.
"""

__version__ = "0.1.0"
