"""The paper experiments behind ``python -m mamlkit reproduce``: one module each, a shared
evaluation recipe and job runner (``common``) and the report writers (``report``)."""
