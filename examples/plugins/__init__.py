"""Example user plugins (docs/plugins/writing-plugins.md walks through canary_tag.py)."""
