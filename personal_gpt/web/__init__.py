"""The edge: Starlette routes and the Streamlit glue the pages use.

The only package in ``personal_gpt`` that imports Streamlit. Pages call
``glue`` for the cached Services, the acting Principal and small helpers.
"""
