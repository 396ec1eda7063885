"""Llama 3.2 Vision (11B, 90B; Mllama): model.py, checkpoint.py, family.py, image.py (preprocessing)."""
