"""Llama 3.2 text (1B, 3B): model.py, checkpoint.py (Meta and Hugging Face readers), family.py."""
