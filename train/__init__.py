"""Training SaShiMi models: `python -m train` (train/__main__.py) over the loop in train/loop.py."""
