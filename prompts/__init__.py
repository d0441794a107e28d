"""Built-in prompt templates (NAME.j2); packaged as imitate._prompts (see imitate/resources.py)."""
