"""Two-phase training (localization, then classification with joint fine-tuning) and evaluation."""
