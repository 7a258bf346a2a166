"""Configuration: the entity schema (`schema`), loading it from files (`loader`).

Nothing is imported eagerly: worker processes need the schema classes but not the YAML loader.
"""
