"""Knowledge files: parse (unstructured, in a subprocess) -> chunk -> embed ->
index -> search, with the file, page and section of every passage.

Nothing here imports Streamlit; unstructured, torch and transformers load only
inside the functions (or the parse subprocess) that need them.
"""
