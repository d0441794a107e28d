"""Default data shipped with imitate (refusals.txt, seed_tasks.jsonl); packaged as imitate._data (see imitate/resources.py).

The demo models and number sets here stay in the repository and are not packaged.
"""
