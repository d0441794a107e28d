"""collect: rows x template -> requests -> journal -> teacher -> records + failures."""
