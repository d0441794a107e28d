"""imitate: distill teacher language models into small students by imitation learning."""

__version__ = "0.1.0"
