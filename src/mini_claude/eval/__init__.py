"""Evaluation: perplexity, BLEU and ROUGE (`metrics`), and a small harmful-text classifier (`safety`).

Submodules are imported on use: `metrics` pulls in sacrebleu and rouge-score only when a score is asked for.
"""
