"""Prompt templates of the LLM annotator (YAML: id, version, system, user)."""
