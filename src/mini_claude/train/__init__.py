"""Fine-tuning: the data pipeline (`data`: load, validate, clean, de-duplicate, format, split)."""
