"""Localization, map fusion and classification networks (torch, MONAI building blocks)."""
