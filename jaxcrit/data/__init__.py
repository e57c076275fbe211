"""What comes in from outside: the texts (texts.py) and the models and corpora named on the
Hugging Face Hub, fetched into the hub cache (hub.py)."""
